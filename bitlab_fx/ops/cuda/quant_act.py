"""Triton kernel that quantizes activations to int8 for ``bitlab.ternary_linear`` / ``bitlab.int8_linear``.

``_quant_act_kernel``: one program per row; int8 ``xq [M, K_pad]`` (zero padded) and fp32 ``s [M]``, rounding
half to even like ``torch.round``, ``s = (1 / max(amax, EPS)) * 127`` exactly like the reference (whose
``127.0 / t`` is ``t.reciprocal() * 127``). ``MODE_*`` say where ``s`` comes from; the host side is
``launch.quantize_activations``.
"""
from __future__ import annotations

import triton
import triton.language as tl

try:  # the generic libdevice front end (CUDA or HIP); extern calls do not run in the interpreter
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old triton
    from triton.language.extra.cuda import libdevice  # type: ignore

MODE_PER_TOKEN, MODE_FROM_AMAX, MODE_STATIC, MODE_ROW_AMAX = 0, 1, 2, 3


@triton.jit
def _round_half_even(v, INTERPRET: tl.constexpr):
    """Round to nearest, ties to even (``torch.round``); ``|v| <= 128`` here."""
    if INTERPRET:  # no extern calls: adding 1.5 * 2**23 leaves no fraction bits, fp32 addition rounds ties to even
        return (v + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(v)


@triton.jit
def _quant_act_kernel(x_ptr, xq_ptr, s_ptr, src_ptr, K, K_pad, stride_xm,
                      MODE: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr, QMAX: tl.constexpr = 127):
    """Row ``m``: ``xq[m] = clamp(round(x[m] * s), -128, 127)`` zero padded to ``K_pad``; ``s_ptr[m] = s``
    (``QMAX``: codes of fewer bits, the op's ``act_bits``: ``s = qmax / amax``, clamped to ``[-QMAX - 1, QMAX]``).

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
            s = tl.math.div_rn(1.0, tl.maximum(a, 1e-5)) * QMAX
        tl.store(s_ptr + m, s)
        for k0 in range(0, K_pad, BLOCK_K):
            kk = k0 + offs
            v = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
            q = _round_half_even(tl.minimum(tl.maximum(v * s, -QMAX - 1.0), QMAX * 1.0), INTERPRET)
            tl.store(xq_ptr + m * K_pad + kk, q.to(tl.int8), mask=kk < K_pad)
