"""Host-side launches of the Triton kernels: activation quantization, the linear kernel and its split-K reduction.

Also what a launch needs to decide: the weight-scale kind (``_ws_mode``), whether the word GEMV applies
(``uses_words``), whether per-group scales are supported at all (``supports``), and whether this device may
run the inline-assembly paths (``_asm_ok``, the result of ``kernels.self_check``). Launches go through
``torch.library.wrap_triton`` so ``torch.compile`` / ``make_fx`` can trace them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ...quant.packing import BLOCK, LANES
from .configs import LinearConfig
from .epilogue import WS_CHANNEL, WS_GROUP, WS_TENSOR, _splitk_reduce_kernel
from .linear import _linear_kernel
from .quant_act import MODE_FROM_AMAX, MODE_PER_TOKEN, MODE_ROW_AMAX, MODE_STATIC, _quant_act_kernel

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover
    _InterpretedFunction = ()

_ASM_OK: dict = {}  # str(device) -> whether the inline-assembly paths passed self_check there


def _asm_ok(device: torch.device) -> bool:
    return _ASM_OK.get(str(device), True)


def _interpreted(kernel) -> bool:
    """True under ``TRITON_INTERPRET=1`` (read by ``triton.jit`` when this module was imported)."""
    return bool(_InterpretedFunction) and isinstance(kernel, _InterpretedFunction)


def _launch(kernel):
    """``torch.library.wrap_triton`` so torch.compile / make_fx can trace the launch (a no-op in eager)."""
    return torch.library.wrap_triton(kernel)


def quantize_activations(x2: Tensor, act: str, static_multiplier: Optional[Tensor], k_pad: int, act_bits: int = 8):
    """int8 ``xq [M, k_pad]`` (zero padded) and fp32 ``s [M]`` for a 2-D input, exactly like the reference
    (``act_bits``: signed codes of that many bits)."""
    qmax = 2 ** (act_bits - 1) - 1
    m, k = x2.shape
    xq = torch.empty(m, k_pad, dtype=torch.int8, device=x2.device)
    s = torch.empty(m, dtype=torch.float32, device=x2.device)
    block_k = min(4096, max(128, triton.next_power_of_2(max(k_pad, 1))))
    interp = _interpreted(_quant_act_kernel)
    kernel = _launch(_quant_act_kernel)
    if static_multiplier is not None:
        mode, src = MODE_STATIC, static_multiplier.reshape(1).to(torch.float32)
    elif act == "per_token":
        mode, src = MODE_PER_TOKEN, s
    else:
        amax = torch.empty(m, dtype=torch.float32, device=x2.device)
        kernel[(m,)](x2, xq, amax, amax, k, k_pad, x2.stride(0),
                     MODE=MODE_ROW_AMAX, BLOCK_K=block_k, INTERPRET=interp, QMAX=qmax, num_warps=4)
        mode, src = MODE_FROM_AMAX, amax.amax().reshape(1)
    kernel[(m,)](x2, xq, s, src, k, k_pad, x2.stride(0),
                 MODE=mode, BLOCK_K=block_k, INTERPRET=interp, QMAX=qmax, num_warps=4)
    return xq, s


def _ws_mode(weight_scale: Tensor) -> int:
    if weight_scale.dim() == 2:
        return WS_GROUP
    return WS_CHANNEL if weight_scale.shape[0] != 1 else WS_TENSOR


def supports(k: int, weight_scale: Tensor) -> bool:
    """Per-group scales need groups of a multiple of 32 columns (each 32-run of K in one group)."""
    return weight_scale.dim() != 2 or (k // weight_scale.shape[1]) % LANES == 0


def uses_words(cfg: LinearConfig, packed: bool, act_float: bool, k: int) -> bool:
    """Whether ``cfg`` runs the dp4a word GEMV (given 4-byte-aligned weight rows): int8 activations, no
    ``tl.dot``, and packed weights or int8 rows of whole words."""
    return not cfg.use_dot and not act_float and (packed or k % 4 == 0)


def _launch_linear(cfg: LinearConfig, out: Tensor, *, xin, weight, ws, s, bias, m, n, k, k_pad, groups, group_size,
                   packed, act_float, ws_mode, stride_xm, bias_codes=None, bias_bits=0) -> None:
    """Launch ``_linear_kernel`` (and the split-K reduction) with tile config ``cfg``, writing ``out [M, N]``.
    ``bias_codes`` (int32, an IntBias) take the bias slot and join the integer sums in the epilogue; with
    ``bias_bits`` the epilogue quantizes the float bias per token and adds those codes."""
    bias_bits = bias_bits if bias is not None and bias_codes is None else 0
    iters = -(-k_pad // (cfg.nb * BLOCK))
    per_split = -(-iters // cfg.split_k)
    codes = bias_codes is not None
    bias = bias_codes if codes else bias
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
        ASM=not interp and _asm_ok(out.device), BIAS_CODES=codes, BIAS_BITS=bias_bits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial:
        rbm = min(16, triton.next_power_of_2(m))
        rgrid = (triton.cdiv(n, 64), triton.cdiv(m, rbm))
        _launch(_splitk_reduce_kernel)[rgrid](
            dest, ws, s, bias_arg, out, m, n, cfg.split_k, WS_MODE=ws_mode, ACT_FLOAT=act_float, HAS_BIAS=has_bias,
            BLOCK_M=rbm, BLOCK_N=64, INTERPRET=interp, BIAS_CODES=codes, BIAS_BITS=bias_bits, num_warps=4)
