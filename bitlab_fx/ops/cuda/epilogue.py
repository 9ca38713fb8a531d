"""Triton epilogue of the linear kernels, and the split-K reduction kernel that ends in it.

* ``_epilogue``: as in ``reference.py``, ``y = float(acc) * ws[n] / s[m] + bias`` (per-group scales are
  already applied to ``acc``), cast to ``x.dtype`` and stored; ``WS_*`` name the weight-scale kinds. With
  ``BIAS_CODES`` the bias is int32 codes (an IntBias) added to the integer ``acc`` first:
  ``y = float(acc + bias_codes[n]) * ws[n] / s[m]``. With ``BIAS_BITS > 0`` (an IntBias on a per-token input
  step) the float bias is quantized per token first, ``clamp(round(bias[n] / (ws[n] / s[m])), ...)``
  (:func:`_token_bias_codes`, as ``arithmetic.token_bias_codes`` and the C kernel's ``int_bias_at``).
* ``_splitk_reduce_kernel``: sums the ``[SPLIT_K, M, N]`` partials of ``linear._linear_kernel`` in a fixed
  order (deterministic, no atomics) and applies the epilogue.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .quant_act import libdevice

WS_TENSOR, WS_CHANNEL, WS_GROUP = 0, 1, 2


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
def _rint(v, INTERPRET: tl.constexpr):
    """Round to nearest, ties to even (``torch.round``), any fp32 magnitude: the interpreter (no extern calls)
    adds and subtracts 2**23, where the spacing of fp32 is 1; from 2**23 up every fp32 is a whole number."""
    if INTERPRET:
        r = tl.where(v >= 0, (v + 8388608.0) - 8388608.0, (v - 8388608.0) + 8388608.0)
        return tl.where(tl.abs(v) >= 8388608.0, v, r)
    else:
        return libdevice.rint(v)


@triton.jit
def _token_bias_codes(offs_n, offs_m, mask_n, mask_m, ws_ptr, s_ptr, bias_ptr, WS_MODE: tl.constexpr,
                      BIAS_BITS: tl.constexpr, INTERPRET: tl.constexpr):
    """int32 ``[BN, BM]``: the float bias quantized on each token's step ``ws[n] / s[m]`` (an IntBias on a dynamic
    multiplier), ``clamp(round(bias[n] / step), -2**(BIAS_BITS-1), 2**(BIAS_BITS-1)-1)``; clamping before rounding
    gives the same whole numbers, and a code of 2**31 (32 bits only) saturates like the C kernel's."""
    if WS_MODE == 0:
        ws = tl.load(ws_ptr) + tl.zeros([offs_n.shape[0]], dtype=tl.float32)
    else:
        ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=1.0)
    s = tl.load(s_ptr + offs_m, mask=mask_m, other=1.0)
    b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    step = tl.math.div_rn(ws[:, None], s[None, :])
    q = tl.math.div_rn(b[:, None] + tl.zeros_like(step), step)
    lo: tl.constexpr = -(2.0 ** (BIAS_BITS - 1))
    hi: tl.constexpr = 2.0 ** (BIAS_BITS - 1) - 1.0
    q = _rint(tl.minimum(tl.maximum(q, lo), hi), INTERPRET)
    return tl.where(q >= 2147483648.0, 2147483647, q.to(tl.int32))


@triton.jit
def _epilogue(acc, offs_n, offs_m, mask_n, mask_m, ws_ptr, s_ptr, bias_ptr, out_ptr, N,
              WS_MODE: tl.constexpr, ACT_FLOAT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
              BIAS_CODES: tl.constexpr = False, BIAS_BITS: tl.constexpr = 0):
    """``acc [BN, BM]`` -> ``out[m, n] = float(acc) * ws[n] / s[m] + bias[n]`` (ws already applied per group), or
    ``float(acc + bias_codes[n]) * ws[n] / s[m]`` with integer bias codes (``BIAS_CODES``: int32 ``bias_ptr``), or
    with the float bias quantized per token (``BIAS_BITS > 0``: :func:`_token_bias_codes`)."""
    if HAS_BIAS and BIAS_CODES:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0)[:, None]
    if HAS_BIAS and BIAS_BITS > 0:
        acc = acc + _token_bias_codes(offs_n, offs_m, mask_n, mask_m, ws_ptr, s_ptr, bias_ptr, WS_MODE, BIAS_BITS,
                                      INTERPRET)
    y = acc.to(tl.float32)
    if WS_MODE == 0:
        y = y * tl.load(ws_ptr)
    elif WS_MODE == 1:
        y = y * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    if not ACT_FLOAT:
        s = tl.load(s_ptr + offs_m, mask=mask_m, other=1.0)
        y = tl.math.div_rn(y, s[None, :])
    if HAS_BIAS and not BIAS_CODES and BIAS_BITS == 0:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    y = _to_out_dtype(y, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(ptrs, y, mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _splitk_reduce_kernel(part_ptr, ws_ptr, s_ptr, bias_ptr, out_ptr, M, N, SPLIT_K,
                          WS_MODE: tl.constexpr, ACT_FLOAT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
                          BIAS_CODES: tl.constexpr = False, BIAS_BITS: tl.constexpr = 0):
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
              WS_MODE, ACT_FLOAT, HAS_BIAS, INTERPRET, BIAS_CODES, BIAS_BITS)
