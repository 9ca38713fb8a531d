"""Eager CPU inference without the dispatcher: a converted linear layer runs its op's CPU kernel directly.

Calling ``torch.ops.bitlab.ternary_linear`` from Python goes through torch's dispatcher and back into the
Python function this package registers for the CPU key: about as long as the kernel itself on a decode step
(M = 1) of a small layer, and a decoder calls ~200 of them per token. When nothing but that registration
would see the call, a converted layer calls the same function body itself (:func:`linear`), which is the
same computation by construction: the same ``_linear`` on the same arguments.

"Nothing else would see it" (:func:`eligible`): a plain CPU tensor (no subclass, so no FakeTensor,
FunctionalTensor or tensor subclass), no autograd recording, no ``TorchDispatchMode`` or
``TorchFunctionMode`` active (profiler, FlopCounter, export and FX tracing keep seeing the op), and not
inside ``torch.compile`` tracing. ``BITLAB_FX_DIRECT_CPU=0`` turns it off (every call goes through the op).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import _schema
from . import _linear, _supported, kernel_library
from .torch_kernels import installed as _cxx_installed

_WEIGHT_FORMAT_CODE = {"ternary": 0, "int8": 1, "int4": 2}  # the kernel's wfmt (bitlab_cpu.h)
_ENABLED = os.environ.get("BITLAB_FX_DIRECT_CPU", "1") not in ("0", "")
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_grad_enabled = torch.is_grad_enabled
_compiling = torch.compiler.is_compiling


def eligible(x) -> bool:
    """Whether a call on ``x`` may skip the dispatcher (see the module docstring). Not once the C++ kernels run
    the ops (torch_kernels.py): the dispatcher then costs ~2 us, less than this path's Python."""
    # is_compiling() first: torch.compile reads it as True and traces no further (the op lands in its graph)
    return (_ENABLED and not _compiling() and not _cxx_installed() and type(x) is Tensor and x.is_cpu
            and not (x.requires_grad and _grad_enabled()) and not _dispatch_modes() and not _function_modes())


def linear(weight_format: str, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], act: str,
           static_multiplier: Optional[Tensor], in_features: int, bias_codes: Optional[Tensor] = None,
           act_bits: int = 8, bias_bits: int = 0) -> Optional[Tensor]:
    """The op's CPU kernel on these arguments, or None where the op itself must run: no kernel library, a
    shape the kernel does not take (the op then raises its error or runs the reference), a weight elsewhere."""
    if (x.dtype not in _schema.FLOAT_DTYPES or x.dim() == 0 or x.shape[-1] != in_features or not weight.is_cpu
            or weight_format not in _WEIGHT_FORMAT_CODE):
        return None
    lib = kernel_library()
    if lib is None or not _supported(x, weight_scale, act, ternary=weight_format == "ternary"):
        return None
    if bias_codes is not None or act_bits != 8 or bias_bits:  # the op checks these (IntBias, codes of fewer bits)
        return None
    return _linear(lib, _WEIGHT_FORMAT_CODE[weight_format], x, weight, weight_scale, bias, act, static_multiplier)


_LINEAR_OPS = {"ternary_linear": "ternary", "int8_linear": "int8", "int4_linear": "int4"}


def linear_op_format(op) -> Optional[str]:
    """The weight format of a ``torch.ops.bitlab`` linear op overload, or None for any other callable."""
    name = getattr(op, "_opname", None)
    return _LINEAR_OPS.get(name) if getattr(op, "namespace", None) == "bitlab" else None


def call_linear_op(op, x, weight, weight_scale, bias=None, act="per_token", act_scale=None, *rest, **kwargs):
    """``op(x, weight, ...)`` exactly, through the kernel directly where :func:`eligible` (what a converted graph
    runs in eager mode in place of each linear op node; tracers and compilers see the op itself)."""
    if eligible(x):
        fmt = _LINEAR_OPS[op._opname]
        in_features = rest[0] if rest else (weight.shape[-1] if fmt == "int8" else -1)
        multiplier = _schema.resolve_multiplier(op._opname, act_scale, kwargs.get("act_multiplier"))
        y = linear(fmt, x, weight, weight_scale, bias, act, multiplier, in_features, kwargs.get("bias_codes"),
                   kwargs.get("act_bits", 8), kwargs.get("bias_bits", 0))
        if y is not None:
            return y
    return op(x, weight, weight_scale, bias, act, act_scale, *rest, **kwargs)
