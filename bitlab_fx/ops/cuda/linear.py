"""The Triton linear kernel of ``bitlab.ternary_linear`` and ``bitlab.int8_linear``: one output tile per program.

``_linear_kernel`` computes ``y^T[BN, BM] = W[BN, K] . xq^T[K, BM]`` over the K range of its split: the
``dp4a`` word GEMV (``gemv._gemv_words``) or the run-by-run ``tl.dot`` / elementwise path
(``dot._runs_tile``), then either the epilogue (``epilogue._epilogue``) or, with deterministic split-K, a
store of the partials into the workspace ``[SPLIT_K, M, N]`` (int32, or fp32 when already scaled) that
``epilogue._splitk_reduce_kernel`` sums. No atomics, no host sync, no data-dependent launch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dot import _runs_tile
from .epilogue import _epilogue
from .gemv import _gemv_words


@triton.jit
def _linear_kernel(x_ptr, w_ptr, ws_ptr, s_ptr, bias_ptr, out_ptr,
                   M, N, K, K_pad, G, GROUP_SIZE, stride_xm, stride_wn, ITERS_PER_SPLIT,
                   PACKED: tl.constexpr, ACT_FLOAT: tl.constexpr, WS_MODE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, USE_DOT: tl.constexpr, WORDS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, INTERPRET: tl.constexpr,
                   ASM: tl.constexpr, BIAS_CODES: tl.constexpr = False, BIAS_BITS: tl.constexpr = 0):
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
        acc = _runs_tile(x_ptr, w_ptr, ws_ptr, offs_n, offs_m, mask_n, mask_m, K, G, GROUP_SIZE, stride_xm,
                         stride_wn, it0, it1, PACKED, ACT_FLOAT, WS_MODE, USE_DOT, BLOCK_M, BLOCK_N, NB, ASM)
    if WRITE_PARTIAL:
        ptrs = out_ptr + (pid_k * M + offs_m.to(tl.int64))[None, :] * N + offs_n[:, None]
        tl.store(ptrs, acc, mask=mask_n[:, None] & mask_m[None, :])
    else:
        _epilogue(acc, offs_n, offs_m, mask_n, mask_m, ws_ptr, s_ptr, bias_ptr, out_ptr, N,
                  WS_MODE, ACT_FLOAT, HAS_BIAS, INTERPRET, BIAS_CODES, BIAS_BITS)
