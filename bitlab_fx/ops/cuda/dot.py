"""Triton run-by-run path of the linear kernels: int8 ``tl.dot`` for larger M, elementwise products otherwise.

Each step of ``NB`` 128-blocks of K loads ``NB * 32`` packed bytes per output row; shifts 0/2/4/6 and a mask
give four runs ``r`` of codes, ``w = code - 1`` in {-1, 0, 1} (int8 weights are read straight from
``[N, K]``); run ``r`` pairs with activations ``k = 128 b + 32 r + j``. With ``USE_DOT`` the products are an
int8 ``tl.dot`` with int32 accumulation, the weight tile as the left operand (it stays in registers after
unpacking); else elementwise products reduced once after the K loop (a GEMV, no padding of M to 16).
``act="none"`` runs it on fp32 elements (IEEE ``tl.dot``). Called by ``linear._linear_kernel`` with
``WORDS=False``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack_run(b, r: tl.constexpr, ASM: tl.constexpr):
    """Packed uint8 bytes -> the int8 weights of run ``r``, ``((b >> 2r) & 3) - 1``. With ``ASM``, four bytes
    at a time in one register (SWAR: shift, mask, and a borrow-free byte-wise subtract of 1)."""
    if not ASM:
        return ((b >> (2 * r)) & 3).to(tl.int8) - 1
    elif r == 0:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; and.b32 t, $1, 0x03030303; or.b32 t, t, 0x80808080; sub.u32 t, t, 0x01010101; "
            "xor.b32 $0, t, 0x80808080; }", "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    elif r == 1:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, 2; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
            "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }", "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    elif r == 2:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
            "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }", "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.b32 t, $1, 6; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
            "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }", "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)



@triton.jit
def _run_product(w, x_cols, kk, mask_m, K, ACT_FLOAT: tl.constexpr, USE_DOT: tl.constexpr):
    """The products of one run: weights ``w [BN, RUN]`` with the activations at ``kk`` of the columns
    ``x_cols``; ``[BN, BM]`` (``tl.dot``, int32 or IEEE fp32) or elementwise ``[BN, RUN, BM]``."""
    if ACT_FLOAT:
        xv = tl.load(x_cols + kk[:, None], mask=(kk < K)[:, None] & mask_m[None, :], other=0.0)
        xv = xv.to(tl.float32)
        w = w.to(tl.float32)
        if USE_DOT:
            part = tl.dot(w, xv, input_precision="ieee")
        else:
            part = w[:, :, None] * xv[None, :, :]
    else:
        xv = tl.load(x_cols + kk[:, None], mask=mask_m[None, :], other=0)
        if USE_DOT:
            part = tl.dot(w, xv, out_dtype=tl.int32)
        else:
            part = w.to(tl.int32)[:, :, None] * xv.to(tl.int32)[None, :, :]
    return part


@triton.jit
def _runs_tile(x_ptr, w_ptr, ws_ptr, offs_n, offs_m, mask_n, mask_m, K, G, GROUP_SIZE, stride_xm, stride_wn,
               it0, it1, PACKED: tl.constexpr, ACT_FLOAT: tl.constexpr, WS_MODE: tl.constexpr,
               USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
               ASM: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_M]`` dot products over steps ``it0 .. it1``, run by run: int32, or fp32 with
    ``ACT_FLOAT`` or per-group scales (already scaled). The host makes ``K_pad`` a multiple of the step
    (``NB * 128``), so packed weights and ``xq`` need no mask along K."""
    RUN: tl.constexpr = NB * 32
    BLOCK_K: tl.constexpr = NB * 128
    FLOAT_ACC: tl.constexpr = ACT_FLOAT or WS_MODE == 2
    i = tl.arange(0, RUN)
    k_run = (i // 32) * 128 + (i % 32)  # k of element i of run 0, relative to the step's first k
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    if USE_DOT:  # [BN, BM]; the elementwise GEMV keeps [BN, RUN, BM] and reduces once after the loop
        if FLOAT_ACC:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    else:
        if FLOAT_ACC:
            acc = tl.zeros([BLOCK_N, RUN, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, RUN, BLOCK_M], dtype=tl.int32)
    for it in range(it0, it1):
        k0 = it * BLOCK_K
        if PACKED:  # one contiguous load of NB * 32 bytes per output row
            b = tl.load(w_rows + (k0 // 4 + i)[None, :], mask=mask_n[:, None], other=0)
        for r in tl.static_range(4):
            kk = k0 + r * 32 + k_run
            if PACKED:
                w = _unpack_run(b, r, ASM)
            else:
                w = tl.load(w_rows + kk[None, :], mask=mask_n[:, None] & (kk < K)[None, :], other=0)
            part = _run_product(w, x_cols, kk, mask_m, K, ACT_FLOAT, USE_DOT)
            if WS_MODE == 2:  # the host guarantees that every run of this step lies in one group
                g = tl.minimum((k0 + r * 32) // GROUP_SIZE, G - 1)  # runs past K (padding) add 0
                wsg = tl.load(ws_ptr + offs_n * G + g, mask=mask_n, other=0.0)
                if USE_DOT:
                    acc += part.to(tl.float32) * wsg[:, None]
                else:
                    acc += part.to(tl.float32) * wsg[:, None, None]
            else:
                acc += part
    if not USE_DOT:
        acc = tl.sum(acc, axis=1)
    return acc
