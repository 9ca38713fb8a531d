"""Triton decode GEMV of the linear kernels on 32-bit words with ``dp4a`` (the ``WORDS`` path).

For small M: int8 activations and weights four to a register, one ``dp4a`` per word; packed ternary codes
``c = w + 1`` go in unsigned and ``sum(x)`` is subtracted once at the end. Handles per-group scales
(fp32 accumulation, scaled per run) and the K range of one split-K program (``it0 .. it1``). Called by
``linear._linear_kernel`` with ``WORDS=True``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dp4a(a, b, c, SIGNED_A: tl.constexpr, ASM: tl.constexpr):
    """``c + sum_t a.byte[t] * b.byte[t]`` on int32 lanes: ``b``'s bytes signed, ``a``'s unsigned (ternary
    codes 0..2) or signed (``SIGNED_A``, int8 weights). One ``dp4a`` instruction with ``ASM``; else (the
    interpreter, which runs no inline assembly, or a GPU that failed :func:`self_check`) byte by byte."""
    if not ASM:
        for t in tl.static_range(4):
            bt = (b << (24 - 8 * t)) >> 24  # arithmetic shift: signed byte t
            if SIGNED_A:
                at = (a << (24 - 8 * t)) >> 24
            else:
                at = (a >> (8 * t)) & 0xFF
            c = c + at * bt
        return c
    elif SIGNED_A:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _gemv_words(x_ptr, w_ptr, ws_ptr, offs_n, offs_m, mask_n, mask_m, K, G, GROUP_SIZE, stride_xm, stride_wn,
                it0, it1, PACKED: tl.constexpr, WS_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, NB: tl.constexpr, ASM: tl.constexpr):
    """Decode GEMV on 32-bit words: int8 activations and weights four to a register, ``dp4a`` products.

    Word ``j`` of run ``r`` in a step covers ``k = k0 + 128 (j // 8) + 32 r + 4 (j % 8) + 0..3``: the same four
    ``k`` in the activation row and, for packed weights, in packed word ``k0 / 16 + j`` (bits ``2r``, one
    byte per ``k``). Ternary codes ``c = w + 1`` go into ``dp4a`` unsigned, and ``sum(x)`` (a ``dp4a`` with
    ``0x01010101`` per activation word, shared by every row) is subtracted once at the end. Products stay in
    a ``[BLOCK_N, words, BLOCK_M]`` accumulator, reduced across words once after the K loop. Returns the
    ``[BLOCK_N, BLOCK_M]`` int32 dot products (fp32, already scaled, with per-group scales).
    """
    W: tl.constexpr = NB * 8
    GROUPED: tl.constexpr = WS_MODE == 2
    # every tensor is built in 3-D [BLOCK_N, W, BLOCK_M] form, so loads land in the layout of the products
    j = tl.arange(0, W)[None, :, None]
    kw = 32 * (j // 8) + (j % 8)  # word offset of word j of run 0 from k0 / 4
    xw_rows = x_ptr.to(tl.pointer_type(tl.int32)) + offs_m.to(tl.int64)[None, None, :] * (stride_xm // 4)
    ww_rows = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n.to(tl.int64)[:, None, None] * (stride_wn // 4)
    mask_m3 = mask_m[None, None, :]
    mask_n3 = mask_n[:, None, None]
    if GROUPED:
        acc = tl.zeros([BLOCK_N, W, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, W, BLOCK_M], dtype=tl.int32)
    xs = tl.zeros([1, W, BLOCK_M], dtype=tl.int32)
    ones = tl.full([1, W, BLOCK_M], 0x01010101, dtype=tl.int32)
    for it in range(it0, it1):
        k0w = it * (NB * 32)  # k0 / 4
        if PACKED:  # NB * 32 packed bytes per row: one contiguous load
            cw = tl.load(ww_rows + it * W + j, mask=mask_n3, other=0)
        for r in tl.static_range(4):
            kx = k0w + 8 * r + kw
            xw = tl.load(xw_rows + kx, mask=mask_m3, other=0)
            if PACKED:
                a = (cw >> (2 * r)) & 0x03030303
            else:
                a = tl.load(ww_rows + kx, mask=mask_n3 & (4 * kx < K), other=0)
            if GROUPED:
                part = _dp4a(a, xw, tl.zeros([BLOCK_N, W, BLOCK_M], dtype=tl.int32), not PACKED, ASM)
                if PACKED:
                    part -= _dp4a(ones, xw, tl.zeros([1, W, BLOCK_M], dtype=tl.int32), False, ASM)
                g = tl.minimum((4 * k0w + 32 * r) // GROUP_SIZE, G - 1)  # runs past K (padding) add 0
                wsg = tl.load(ws_ptr + offs_n * G + g, mask=mask_n, other=0.0)
                acc += part.to(tl.float32) * wsg[:, None, None]
            else:
                acc = _dp4a(a, xw, acc, not PACKED, ASM)
                if PACKED:
                    xs = _dp4a(ones, xw, xs, False, ASM)
    tot = tl.sum(acc, axis=1)
    if PACKED and not GROUPED:
        tot -= tl.sum(xs, axis=1)
    return tot
