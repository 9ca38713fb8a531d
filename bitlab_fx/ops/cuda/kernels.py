"""Triton kernels for ``bitlab.ternary_linear`` and ``bitlab.int8_linear``.

Three kernels, launched on whatever device the tensors are on (CUDA, or CPU under
``TRITON_INTERPRET=1``, which is how the tests run without a GPU):

* ``_quant_act_kernel``: one program per row; int8 ``xq [M, K_pad]`` (zero padded) and fp32 ``s [M]``,
  rounding half to even like ``torch.round``, ``s = (1 / max(amax, EPS)) * 127`` exactly like the
  reference (whose ``127.0 / t`` is ``t.reciprocal() * 127``).
* ``_linear_kernel``: ``y^T[BN, BM] = W[BN, K] . xq^T[K, BM]`` over K in steps of ``NB`` 128-blocks. Each
  step loads ``NB * 32`` packed bytes per output row; shifts 0/2/4/6 and a mask give four runs ``r`` of
  codes, ``w = code - 1`` in {-1, 0, 1}; run ``r`` pairs with activations ``k = 128 b + 32 r + j``.
  Small M (decode): elementwise products reduced with ``tl.sum`` (a GEMV, no padding of M to 16).
  Larger M: int8 ``tl.dot`` with int32 accumulation, the weight tile as the left operand (it stays in
  registers after unpacking). Optional deterministic split-K: partials go to a workspace
  ``[SPLIT_K, M, N]`` (int32, or fp32 when already scaled) and ``_splitk_reduce_kernel`` sums them in a
  fixed order and applies the epilogue. No atomics, no host sync, no data-dependent launch.
* Epilogue, as in ``reference.py``: ``y = float(acc) * ws[n] / s[m] + bias`` (per-group:
  ``sum_g float(acc_g) * ws[n, g] / s[m]``), in ``x.dtype``.

int8 weights run through the same kernel with ``PACKED=False`` (the runs are read straight from
``[N, K]``). ``act="none"`` runs it with float activations (fp32 products, IEEE ``tl.dot``).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...quant.packing import BLOCK, LANES, pack_ternary, padded_k
from ...quant.primitives import EPS
from .. import reference

try:  # the generic libdevice front end (CUDA or HIP); extern calls do not run in the interpreter
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old triton
    from triton.language.extra.cuda import libdevice  # type: ignore

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover
    _InterpretedFunction = ()

# ---------------------------------------------------------------------------------------------- kernels

MODE_PER_TOKEN, MODE_FROM_AMAX, MODE_STATIC, MODE_ROW_AMAX = 0, 1, 2, 3
WS_TENSOR, WS_CHANNEL, WS_GROUP = 0, 1, 2


@triton.jit
def _round_half_even(v, INTERPRET: tl.constexpr):
    """Round to nearest, ties to even (``torch.round``); ``|v| <= 128`` here."""
    if INTERPRET:  # no extern calls: adding 1.5 * 2**23 leaves no fraction bits, fp32 addition rounds ties to even
        return (v + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(v)


@triton.jit
def _to_out_dtype(y, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even like ``Tensor.to`` (the GPU cast does; the interpreter's
    bf16 cast truncates, so round the bits by hand there)."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)


@triton.jit
def _quant_act_kernel(x_ptr, xq_ptr, s_ptr, src_ptr, K, K_pad, stride_xm,
                      MODE: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """Row ``m``: ``xq[m] = clamp(round(x[m] * s), -128, 127)`` zero padded to ``K_pad``; ``s_ptr[m] = s``.

    MODE 0: ``s`` from the row's absmax; 1: from the absmax in ``src_ptr[0]``; 2: ``s = src_ptr[0]``;
    3: only write the row's absmax to ``s_ptr[m]`` (first step of per-tensor quantization).
    """
    m = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + m * stride_xm
    offs = tl.arange(0, BLOCK_K)
    if MODE == 0 or MODE == 3:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        a = tl.max(amax, axis=0)
    elif MODE == 1:
        a = tl.load(src_ptr).to(tl.float32)
    else:
        a = 0.0
    if MODE == 3:
        tl.store(s_ptr + m, a)
    else:
        if MODE == 2:
            s = tl.load(src_ptr).to(tl.float32)
        else:
            s = tl.math.div_rn(1.0, tl.maximum(a, 1e-5)) * 127.0
        tl.store(s_ptr + m, s)
        for k0 in range(0, K_pad, BLOCK_K):
            kk = k0 + offs
            v = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
            q = _round_half_even(tl.minimum(tl.maximum(v * s, -128.0), 127.0), INTERPRET)
            tl.store(xq_ptr + m * K_pad + kk, q.to(tl.int8), mask=kk < K_pad)


@triton.jit
def _epilogue(acc, offs_n, offs_m, mask_n, mask_m, ws_ptr, s_ptr, bias_ptr, out_ptr, N,
              WS_MODE: tl.constexpr, ACT_FLOAT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc [BN, BM]`` -> ``out[m, n] = float(acc) * ws[n] / s[m] + bias[n]`` (ws already applied per group)."""
    y = acc.to(tl.float32)
    if WS_MODE == 0:
        y = y * tl.load(ws_ptr)
    elif WS_MODE == 1:
        y = y * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    if not ACT_FLOAT:
        s = tl.load(s_ptr + offs_m, mask=mask_m, other=1.0)
        y = tl.math.div_rn(y, s[None, :])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    y = _to_out_dtype(y, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(ptrs, y, mask=mask_n[:, None] & mask_m[None, :])


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


@triton.jit
def _linear_kernel(x_ptr, w_ptr, ws_ptr, s_ptr, bias_ptr, out_ptr,
                   M, N, K, K_pad, G, GROUP_SIZE, stride_xm, stride_wn, ITERS_PER_SPLIT,
                   PACKED: tl.constexpr, ACT_FLOAT: tl.constexpr, WS_MODE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, USE_DOT: tl.constexpr, WORDS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, INTERPRET: tl.constexpr,
                   ASM: tl.constexpr):
    """One ``[BLOCK_N, BLOCK_M]`` tile of ``y^T`` over the K range of split ``program_id(2)``.

    ``x_ptr``: int8 ``xq [M, K_pad]`` (row stride ``stride_xm``), or the float input when ``ACT_FLOAT``.
    ``w_ptr``: packed uint8 ``[N, K_pad/4]`` or int8 ``[N, K]`` (row stride ``stride_wn``).
    ``out_ptr``: ``y [M, N]``, or the split-K workspace ``[SPLIT_K, M, N]`` when ``WRITE_PARTIAL``.
    ``WORDS``: the ``dp4a`` GEMV (:func:`_gemv_words`); else int8 ``tl.dot`` (``USE_DOT``) or elementwise
    products, on int8 (or, with ``ACT_FLOAT``, fp32) elements. The host makes ``K_pad`` a multiple of the step
    (``NB * 128``), so packed weights and ``xq`` need no mask along K.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    it0 = pid_k * ITERS_PER_SPLIT
    it1 = tl.minimum(it0 + ITERS_PER_SPLIT, K_pad // (NB * 128))
    if WORDS:
        acc = _gemv_words(x_ptr, w_ptr, ws_ptr, offs_n, offs_m, mask_n, mask_m, K, G, GROUP_SIZE, stride_xm,
                          stride_wn, it0, it1, PACKED, WS_MODE, BLOCK_M, BLOCK_N, NB, ASM)
    else:
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
    if WRITE_PARTIAL:
        ptrs = out_ptr + (pid_k * M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None]
        tl.store(ptrs, acc, mask=mask_n[:, None] & mask_m[None, :])
    else:
        _epilogue(acc, offs_n, offs_m, mask_n, mask_m, ws_ptr, s_ptr, bias_ptr, out_ptr, N,
                  WS_MODE, ACT_FLOAT, HAS_BIAS, INTERPRET)


@triton.jit
def _splitk_reduce_kernel(part_ptr, ws_ptr, s_ptr, bias_ptr, out_ptr, M, N, SPLIT_K,
                          WS_MODE: tl.constexpr, ACT_FLOAT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """Sum the ``SPLIT_K`` partials of one tile in split order (deterministic), then the epilogue."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask = mask_n[:, None] & mask_m[None, :]
    ptrs = part_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    acc = tl.load(ptrs, mask=mask, other=0)
    for sk in range(1, SPLIT_K):
        acc += tl.load(ptrs + sk * M * N, mask=mask, other=0)
    _epilogue(acc, offs_n, offs_m, mask_n, mask_m, ws_ptr, s_ptr, bias_ptr, out_ptr, N,
              WS_MODE, ACT_FLOAT, HAS_BIAS, INTERPRET)


# ---------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class LinearConfig:
    """Tile shape of ``_linear_kernel``: ``BLOCK_M`` tokens x ``BLOCK_N`` outputs, ``NB`` 128-blocks of K per
    step, ``use_dot`` (int8 ``tl.dot``, needs ``BLOCK_M, BLOCK_N >= 16``) or the elementwise GEMV, and
    ``split_k`` K splits (1: the epilogue runs in the same kernel)."""
    block_m: int
    block_n: int
    nb: int = 2
    use_dot: bool = False
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


GEMV_MAX_M = 8  # up to this many tokens the elementwise GEMV beats an MMA padded to 16 rows


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # H100 SXM; only used to exercise the same heuristics under the interpreter


def choose_config(m: int, n: int, k_pad: int, group_size: int = 0, sms: int = 132) -> LinearConfig:
    """Fixed tile shapes by problem size (no autotuning: deterministic and CUDA-graph safe).

    Decode (``m <= 8``): elementwise GEMV with narrow N tiles and split-K until ~4 programs per SM.
    Prefill: int8 ``tl.dot``; wide tiles once M is large. Defaults picked for H100, to be tuned with
    ``benchmarks/bench_linear_cuda.py --sweep``.
    """
    if m <= GEMV_MAX_M:
        bm = triton.next_power_of_2(max(m, 1))
        cfg = LinearConfig(block_m=bm, block_n=64 if bm <= 2 else 32 if bm <= 4 else 16, nb=2, num_warps=4)
        target = 4 * sms
    elif m <= 64:
        cfg = LinearConfig(block_m=max(16, triton.next_power_of_2(m)), block_n=64, nb=2, use_dot=True, num_warps=4)
        target = 2 * sms
    elif m <= 128:
        cfg = LinearConfig(block_m=64, block_n=128, nb=1, use_dot=True, num_warps=4)
        target = sms
    else:
        cfg = LinearConfig(block_m=128, block_n=128, nb=1, use_dot=True, num_warps=8)
        target = sms
    return fit_config(cfg, m, n, k_pad, group_size, target)


def fit_config(cfg: LinearConfig, m: int, n: int, k_pad: int, group_size: int = 0,
               target_programs: int = 0) -> LinearConfig:
    """Make ``cfg`` valid for the problem: ``NB`` halved until ``K_pad`` is a whole number of steps and, with
    per-group scales, each step lies inside one group (at ``nb=1``, one group per 32-run); split K (powers
    of two, >= 4 steps each) until ``target_programs``; drop empty splits."""
    nb = cfg.nb
    while nb > 1 and ((group_size and group_size % (nb * BLOCK)) or k_pad % (nb * BLOCK)):
        nb //= 2  # each step inside one group, and K_pad a whole number of steps (no K masks)
    iters = max(1, -(-k_pad // (nb * BLOCK)))
    split = cfg.split_k
    if target_programs:
        tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
        while tiles * split < target_programs and iters // (split * 2) >= 4:
            split *= 2
    per_split = -(-iters // max(1, split))
    split = -(-iters // per_split)
    return replace(cfg, nb=nb, split_k=split)


def autotune_candidates(m: int, n: int, k_pad: int, group_size: int = 0, sms: int = 132) -> list[LinearConfig]:
    """The small space the autotuner (``_pick_config``) times: ``choose_config``'s pick first, then a few neighbours
    (narrower/wider N tiles, more K per step, more or fewer K splits, narrow tiles with no split and so no
    reduction launch; for the MMA path also other ``BLOCK_M``, ``num_warps`` and ``num_stages``). At most 10
    configs, duplicates removed after fitting."""
    base = choose_config(m, n, k_pad, group_size, sms)
    bm = base.block_m
    if not base.use_dot:
        raw = [(LinearConfig(block_m=bm, block_n=bn, nb=nb, num_warps=w), t)
               for bn, nb, w, t in ((base.block_n // 2, 2, 4, 4), (base.block_n * 2, 2, 4, 4), (base.block_n, 4, 4, 4),
                                    (base.block_n, 2, 4, 8), (base.block_n, 2, 4, 2), (base.block_n, 2, 8, 4),
                                    (base.block_n * 2, 4, 8, 2), (16, 2, 4, 0), (32, 4, 4, 0))]  # 0: no split-K
    else:
        raw = [(replace(base, block_n=128 if base.block_n == 64 else 64), 2), (replace(base, num_stages=4), 2),
               (replace(base, num_warps=8 if base.num_warps == 4 else 4), 2),
               (replace(base, nb=2 if base.nb == 1 else 1), 2),
               (replace(base, split_k=1), 0), (replace(base, block_m=max(16, bm // 2)), 2),
               (replace(base, block_m=min(128, bm * 2), block_n=128, num_warps=8), 1)]
    out = [base]
    for cfg, t in raw:
        if cfg.block_n < 8:
            continue
        cfg = fit_config(replace(cfg, split_k=1), m, n, k_pad, group_size, t * sms)
        if cfg not in out:
            out.append(cfg)
    return out[:10]


_TUNED: dict = {}  # problem key -> LinearConfig, filled by _pick_config


def _may_benchmark(x: Tensor) -> bool:
    """Timing needs real tensors and a stream that is not being captured into a CUDA graph."""
    from torch._subclasses import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(x, (FakeTensor, FunctionalTensor)) or torch._guards.detect_fake_mode() is not None:
        return False
    return x.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _time_us(fn) -> float:
    """Median microseconds of ``fn``: ``triton.testing.do_bench`` on a GPU, wall clock under the interpreter."""
    if torch.cuda.is_available() and torch.cuda.is_initialized() and not _interpreted(_linear_kernel):
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=20)
    import time

    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * sorted(ts)[1]


_ASM_OK: dict = {}  # str(device) -> whether the inline-assembly paths passed self_check there


def _asm_ok(device: torch.device) -> bool:
    return _ASM_OK.get(str(device), True)


def self_check(device) -> bool:
    """Run the inline-assembly paths (``dp4a`` GEMV, SWAR unpacking before ``tl.dot``) against the portable
    Triton code on small random problems on ``device``; they must agree bit for bit. On a difference the
    assembly is switched off for that device (slower, still correct) with a warning. Runs once per device,
    on the first eager call of an op there (not inside a CUDA graph capture or a compile trace)."""
    key = str(torch.device(device))
    _ASM_OK[key] = True
    gen = torch.Generator().manual_seed(0)
    ok = True
    for m, cfg, packed, groups in ((1, LinearConfig(block_m=1, block_n=16, nb=2), True, 0),
                                   (5, LinearConfig(block_m=8, block_n=16, nb=1, split_k=2), False, 0),
                                   (3, LinearConfig(block_m=4, block_n=16, nb=1), True, 4),
                                   (20, LinearConfig(block_m=32, block_n=16, nb=2, use_dot=True), True, 0)):
        x = torch.randn(m, 256, generator=gen).to(device)
        wq = torch.randint(-1, 2, (24, 256), generator=gen, dtype=torch.int8)
        w = (pack_ternary(wq) if packed else torch.randint(-128, 128, (24, 256), generator=gen, dtype=torch.int8))
        ws = (torch.rand(24, groups, generator=gen) if groups else torch.rand(24, generator=gen)) + 0.1
        args = (x, w.to(device), ws.to(device), None, "per_token", None, packed, cfg)
        _ASM_OK[key] = True
        fast = _int_linear(*args)
        _ASM_OK[key] = False
        ok = ok and torch.equal(fast, _int_linear(*args))
    _ASM_OK[key] = ok
    if not ok:
        warnings.warn(f"bitlab_fx: the inline-assembly paths of the Triton kernels (dp4a, byte unpacking) gave "
                      f"results that differ from the portable code on {key} "
                      f"({torch.cuda.get_device_name(device) if key.startswith('cuda') else key}); they are "
                      "switched off there, so the ops stay correct but run slower. Please report this with "
                      "your GPU, driver and triton versions.", RuntimeWarning, stacklevel=2)
    return ok


def _ensure_self_check(x: Tensor) -> None:
    if x.device.type == "cuda" and str(x.device) not in _ASM_OK and _may_benchmark(x):
        self_check(x.device)


def tuned_configs() -> dict:
    """A copy of the autotune cache: ``{(M bucket, N, K_pad, group size, packed, act float, ws mode, dtype,
    device): LinearConfig}``."""
    return dict(_TUNED)


def clear_tuned_configs() -> None:
    _TUNED.clear()


# ---------------------------------------------------------------------------------------------- launchers


def _interpreted(kernel) -> bool:
    """True under ``TRITON_INTERPRET=1`` (read by ``triton.jit`` when this module was imported)."""
    return bool(_InterpretedFunction) and isinstance(kernel, _InterpretedFunction)


def _launch(kernel):
    """``torch.library.wrap_triton`` so torch.compile / make_fx can trace the launch (a no-op in eager)."""
    return torch.library.wrap_triton(kernel)


def quantize_activations(x2: Tensor, act: str, act_scale: Optional[Tensor], k_pad: int):
    """int8 ``xq [M, k_pad]`` (zero padded) and fp32 ``s [M]`` for a 2-D input, exactly like the reference."""
    m, k = x2.shape
    xq = torch.empty(m, k_pad, dtype=torch.int8, device=x2.device)
    s = torch.empty(m, dtype=torch.float32, device=x2.device)
    block_k = min(4096, max(128, triton.next_power_of_2(max(k_pad, 1))))
    interp = _interpreted(_quant_act_kernel)
    kernel = _launch(_quant_act_kernel)
    if act_scale is not None:
        mode, src = MODE_STATIC, act_scale.reshape(1).to(torch.float32)
    elif act == "per_token":
        mode, src = MODE_PER_TOKEN, s
    else:
        amax = torch.empty(m, dtype=torch.float32, device=x2.device)
        kernel[(m,)](x2, xq, amax, amax, k, k_pad, x2.stride(0),
                     MODE=MODE_ROW_AMAX, BLOCK_K=block_k, INTERPRET=interp, num_warps=4)
        mode, src = MODE_FROM_AMAX, amax.amax().reshape(1)
    kernel[(m,)](x2, xq, s, src, k, k_pad, x2.stride(0),
                 MODE=mode, BLOCK_K=block_k, INTERPRET=interp, num_warps=4)
    return xq, s


def _ws_mode(weight_scale: Tensor) -> int:
    if weight_scale.dim() == 2:
        return WS_GROUP
    return WS_CHANNEL if weight_scale.shape[0] != 1 else WS_TENSOR


def supports(k: int, weight_scale: Tensor) -> bool:
    """Per-group scales need groups of a multiple of 32 columns (each 32-run of K in one group)."""
    return weight_scale.dim() != 2 or (k // weight_scale.shape[1]) % LANES == 0


def _int_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], act: str,
                act_scale: Optional[Tensor], packed: bool, config: Optional[LinearConfig]) -> Tensor:
    _ensure_self_check(x)
    k = x.shape[-1]
    n = weight.shape[0]
    if not supports(k, weight_scale):
        wq_fn = reference.ternary_linear if packed else reference.int8_linear
        return wq_fn(x, weight, weight_scale, bias, act, act_scale)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    k_pad = padded_k(k)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    ws = weight_scale.to(torch.float32).contiguous()
    ws_mode = _ws_mode(ws)
    groups = ws.shape[1] if ws_mode == WS_GROUP else 1
    group_size = k // groups if ws_mode == WS_GROUP else 0
    act_float = act == "none"
    if act_float:
        xin, s, stride_xm = x2, ws, x2.stride(0)  # s unused
    else:
        xin, s = quantize_activations(x2, act, act_scale, k_pad)
        stride_xm = k_pad
    launch = functools.partial(_launch_linear, xin=xin, weight=weight, ws=ws, s=s, bias=bias, m=m, n=n, k=k,
                               k_pad=k_pad, groups=groups, group_size=group_size, packed=packed, act_float=act_float,
                               ws_mode=ws_mode, stride_xm=stride_xm)
    if config is None:
        config = _pick_config(launch, x2, m, n, k_pad, group_size, (packed, act_float, ws_mode, x.dtype))
    else:
        config = fit_config(config, m, n, k_pad, group_size)
    launch(config, out)
    return out.reshape(*x.shape[:-1], n)


def _pick_config(launch, x2: Tensor, m: int, n: int, k_pad: int, group_size: int, kind: tuple) -> LinearConfig:
    """``choose_config``'s fixed pick, or with autotuning on (:func:`bitlab_fx.ops.cuda.set_autotune`) the
    fastest of :func:`autotune_candidates`, timed once per problem key on the call's own tensors. Calls that
    cannot time (CUDA graph capture, torch.compile tracing) use a tuned config when one is cached, else the
    fixed pick: they never benchmark, sync or allocate beyond the op's own buffers."""
    from . import autotune_enabled

    sms = _num_sms(x2.device)
    if not autotune_enabled():
        return choose_config(m, n, k_pad, group_size, sms)
    bucket = triton.next_power_of_2(max(m, 1)) if m <= 256 else 512 * -(-m // 512)
    key = (bucket, n, k_pad, group_size, *kind, str(x2.device))
    hit = _TUNED.get(key)
    if hit is not None:
        return fit_config(hit, m, n, k_pad, group_size)
    if not _may_benchmark(x2):
        return choose_config(m, n, k_pad, group_size, sms)
    scratch = torch.empty(m, n, dtype=kind[-1], device=x2.device)
    timed = []
    for cfg in autotune_candidates(m, n, k_pad, group_size, sms):
        try:
            launch(cfg, scratch)  # compile, and check that it launches, before timing
            timed.append((_time_us(lambda cfg=cfg: launch(cfg, scratch)), len(timed), cfg))
        except Exception:  # noqa: BLE001  (a config that does not compile or fit this GPU is skipped)
            continue
    best = min(timed)[2] if timed else choose_config(m, n, k_pad, group_size, sms)
    _TUNED[key] = best
    return best


def uses_words(cfg: LinearConfig, packed: bool, act_float: bool, k: int) -> bool:
    """Whether ``cfg`` runs the dp4a word GEMV (given 4-byte-aligned weight rows): int8 activations, no
    ``tl.dot``, and packed weights or int8 rows of whole words."""
    return not cfg.use_dot and not act_float and (packed or k % 4 == 0)


def _launch_linear(cfg: LinearConfig, out: Tensor, *, xin, weight, ws, s, bias, m, n, k, k_pad, groups, group_size,
                   packed, act_float, ws_mode, stride_xm) -> None:
    """Launch ``_linear_kernel`` (and the split-K reduction) with tile config ``cfg``, writing ``out [M, N]``."""
    iters = -(-k_pad // (cfg.nb * BLOCK))
    per_split = -(-iters // cfg.split_k)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else ws
    partial = cfg.split_k > 1
    if partial:
        part_dtype = torch.float32 if (act_float or ws_mode == WS_GROUP) else torch.int32
        dest = torch.empty(cfg.split_k, m, n, dtype=part_dtype, device=out.device)
    else:
        dest = out
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
    interp = _interpreted(_linear_kernel)
    words = (uses_words(cfg, packed, act_float, k) and weight.stride(0) % 4 == 0
             and weight.data_ptr() % 4 == 0)  # the dp4a GEMV reads 4-byte-aligned words
    _launch(_linear_kernel)[grid](
        xin, weight, ws, s, bias_arg, dest, m, n, k, k_pad, groups, max(group_size, 1), stride_xm, weight.stride(0),
        per_split, PACKED=packed, ACT_FLOAT=act_float, WS_MODE=ws_mode, HAS_BIAS=has_bias, WRITE_PARTIAL=partial,
        USE_DOT=cfg.use_dot, WORDS=words, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NB=cfg.nb, INTERPRET=interp,
        ASM=not interp and _asm_ok(out.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial:
        rbm = min(16, triton.next_power_of_2(m))
        rgrid = (triton.cdiv(n, 64), triton.cdiv(m, rbm))
        _launch(_splitk_reduce_kernel)[rgrid](
            dest, ws, s, bias_arg, out, m, n, cfg.split_k, WS_MODE=ws_mode, ACT_FLOAT=act_float, HAS_BIAS=has_bias,
            BLOCK_M=rbm, BLOCK_N=64, INTERPRET=interp, num_warps=4)


def ternary_linear_triton(x: Tensor, packed_weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                          act: str = "per_token", act_scale: Optional[Tensor] = None,
                          config: Optional[LinearConfig] = None) -> Tensor:
    """``bitlab.ternary_linear`` with the Triton kernels, on the tensors' device (no argument checks).

    ``config`` overrides the tile shape chosen by :func:`choose_config` (tests and benchmark sweeps).
    """
    return _int_linear(x, packed_weight, weight_scale, bias, act, act_scale, True, config)


def int8_linear_triton(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                       act: str = "per_token", act_scale: Optional[Tensor] = None,
                       config: Optional[LinearConfig] = None) -> Tensor:
    """``bitlab.int8_linear`` with the Triton kernels (int8 weights ``[N, K]``)."""
    return _int_linear(x, weight, weight_scale, bias, act, act_scale, False, config)


KERNELS = [_quant_act_kernel, _linear_kernel, _splitk_reduce_kernel]
