"""CPU kernels of the grouped-expert linear ops (``bitlab.<format>_grouped_linear``, :mod:`bitlab_fx.ops._grouped`).

One op call walks the experts that have routed rows and runs the packed linear kernel of
:mod:`bitlab_fx.ops.cpu` on each expert's contiguous block of rows (a decode step: the ``top_k`` experts of one
token, one row each; a prompt: every expert's tokens as one batched GEMM), writing into one output. The kernel is
bitwise the reference on each block, so the op is bitwise the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _grouped, reference
from . import _linear, _supported, kernel_library

_WFMT = {"ternary": 0, "int8": 1, "int4": 2}  # the kernel's weight format code (bitlab_cpu.h)


def grouped_linear(fmt: str, x: Tensor, group_ends: Tensor, weight: Tensor, weight_scale: Tensor,
                   bias: Optional[Tensor], act: str, act_multiplier: Optional[Tensor], in_features: int) -> Tensor:
    op = f"{fmt}_grouped_linear"
    n = _grouped.check_grouped_linear(op, fmt, x, group_ends, weight, weight_scale, bias, act, act_multiplier,
                                      in_features)
    ends = _grouped.group_bounds(op, group_ends, x.shape[0])
    multiplier = _grouped.tensor_multiplier(x, act, act_multiplier)
    lib = kernel_library()
    if lib is None:
        return reference.grouped_linear(fmt, x, ends, weight, weight_scale, bias, act, multiplier)
    x = x if x.is_contiguous() else x.contiguous()
    pieces, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            rows, ws = x[start:end], weight_scale[e]
            b = None if bias is None else bias[e]
            if _supported(rows, ws, act, ternary=fmt == "ternary"):
                pieces.append(_linear(lib, _WFMT[fmt], rows, weight[e], ws, b, act, multiplier))
            else:  # a layout the kernel does not take (e.g. ternary groups not covering whole 32-runs)
                pieces.append(reference.grouped_linear(fmt, rows, [end - start], weight[e:e + 1], weight_scale[e:e + 1],
                                                       None if b is None else b[None], act, multiplier))
        start = end
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces) if pieces else x.new_empty(0, n)


def _kernel(fmt: str):
    def kernel(x, group_ends, weight, weight_scale, bias=None, act="per_token", act_multiplier=None, in_features=-1):
        return grouped_linear(fmt, x, group_ends, weight, weight_scale, bias, act, act_multiplier, in_features)
    return kernel


_lib = None


def register() -> None:
    """Register the CPU kernels of the grouped ops (idempotent; compiles nothing)."""
    global _lib
    if _lib is not None:
        return
    _lib = torch.library.Library("bitlab", "IMPL")
    for fmt in _grouped.GROUPED_OPS:
        _lib.impl(f"{fmt}_grouped_linear", _kernel(fmt), "CPU")
