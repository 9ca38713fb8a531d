"""The packed ternary format, one layout for every device.

Code ``c = w + 1`` in {0, 1, 2}, 2 bits, four codes per byte. K is padded with zeros (code 1) to a
multiple of :data:`BLOCK` (128). Inside each 128-wide block, byte ``j`` (0..31) holds
``k = j, j+32, j+64, j+96`` in bits 0-1, 2-3, 4-5, 6-7: one 32-byte load plus shifts by 0/2/4/6 and a
mask gives four runs of 32 consecutive codes. Packed weight: uint8 ``[N, K_pad/4]``.

>>> import torch
>>> from bitlab_fx.quant.packing import pack_ternary, unpack_ternary
>>> w = torch.tensor([[-1, 0, 1, 1, 0]], dtype=torch.int8)
>>> p = pack_ternary(w); p.shape, p.dtype
(torch.Size([1, 32]), torch.uint8)
>>> torch.equal(unpack_ternary(p, 5), w)
True
"""
from __future__ import annotations

import torch

FORMAT_VERSION = 1
BLOCK = 128  # K is padded to a multiple of this
LANES = 32  # bytes per block; codes k, k+32, k+64, k+96 share a byte


def padded_k(k: int) -> int:
    return (k + BLOCK - 1) // BLOCK * BLOCK


def pack_ternary(wq: torch.Tensor) -> torch.Tensor:
    """Pack an integer tensor ``[N, K]`` with values in {-1, 0, 1} to uint8 ``[N, K_pad/4]``."""
    if wq.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D [N, K] tensor, got shape {tuple(wq.shape)}")
    n, k = wq.shape
    kp = padded_k(k)
    # codes w + 1 as bytes (int8 arithmetic), padded with code 1, shifted and or-ed eight bytes at a time: a code
    # takes 2 bits and moves by at most 6, so no bit crosses into the next byte of an int64 word (the training
    # forward packs every weight each step)
    codes = (wq.to(torch.int8) + 1).contiguous()  # (+ keeps a transposed input's strides)
    if kp != k:
        codes = torch.nn.functional.pad(codes, (0, kp - k), value=1)
    words = codes.reshape(n, kp // BLOCK, 4, LANES).view(torch.int64)  # [N, blocks, 4 runs, 4 words]
    packed = words[:, :, 0] | (words[:, :, 1] << 2)
    packed |= words[:, :, 2] << 4
    packed |= words[:, :, 3] << 6
    return packed.view(torch.uint8).reshape(n, kp // 4)


def unpack_ternary(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 ``[N, k]`` with values in {-1, 0, 1}."""
    n, kb = packed.shape
    if kb * 4 != padded_k(k):
        raise ValueError(f"packed weight of shape {tuple(packed.shape)} holds K_pad={kb * 4}, "
                         f"but K={k} needs K_pad={padded_k(k)}")
    p = packed.reshape(n, kb // LANES, 1, LANES)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).reshape(1, 1, 4, 1)
    codes = (p >> shifts) & 3
    return (codes.reshape(n, kb * 4)[:, :k].to(torch.int8) - 1)


def pack_int4(wq: torch.Tensor) -> torch.Tensor:
    """Pack signed integers in [-8, 7] two per byte along K (low nibble = even k): uint8 ``[N, ceil(K/2)]``."""
    n, k = wq.shape
    u = (wq.to(torch.int16) & 0xF).to(torch.uint8)
    if k % 2:
        u = torch.cat([u, u.new_zeros(n, 1)], dim=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[N, k]``."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    u = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k]
    return torch.where(u > 7, u - 16, u)
