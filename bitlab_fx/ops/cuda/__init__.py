"""CUDA implementations of ``bitlab.ternary_linear`` and ``bitlab.int8_linear`` (Triton: entry points in
``kernels.py``, which imports the kernels and launchers split by concern into the modules next to it).

:func:`register` is cheap and imports neither triton nor CUDA: ``bitlab_fx.ops`` calls it at import.
``kernels.py`` (and triton) load the first time a CUDA tensor reaches one of the ops.

How the ops are wired (``torch.library.triton_op`` creates a *new* op and cannot adopt the existing
ops of ``_schema.py``, so we do by hand what it does, for CUDA inputs only):

* eager: ``register_kernel(op, "cuda", fn)``; ``fn`` launches the kernels directly (``wrap_triton``
  switched off, as ``triton_op`` does for its eager path, to skip the tracing HOP).
* ``torch.compile``: a ``FunctionalTensorMode`` rule decomposes the op, for CUDA tensors, into its
  ``wrap_triton`` kernel launches, so AOTAutograd/Inductor see (and schedule) the Triton kernels
  instead of an opaque call; ``fullgraph=True`` holds either way. ``torch.export`` keeps the op
  (exactly like ``triton_op``), and ``BITLAB_TRITON_DECOMPOSE=0`` keeps it opaque under compile too.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import Tensor

from .. import _schema

_OPS = {"ternary_linear": True, "int8_linear": False}  # op name -> packed weights
_registered = False
_autotune = os.environ.get("BITLAB_TRITON_AUTOTUNE", "0") == "1"


def set_autotune(enabled: bool) -> bool:
    """Switch autotuning of the Triton tile configs on or off; returns the previous setting.

    Off (the default, or ``BITLAB_TRITON_AUTOTUNE=0``): each problem size launches the fixed tile config of
    ``kernels.choose_config``. On: the first eager call of each (M bucket, N, K, weight/scale kind, dtype)
    times the few configs of ``kernels.autotune_candidates`` on its own tensors and keeps the fastest; later
    calls, CUDA graph captures and ``torch.compile`` traces reuse it (a capture or trace that finds no tuned
    config uses the fixed one: they never benchmark). Integer-accumulated results are the same bit for bit
    with any config; per-group scales and ``act="none"`` sum floats in a config-dependent order.
    """
    global _autotune
    previous, _autotune = _autotune, bool(enabled)
    return previous


def autotune_enabled() -> bool:
    return _autotune


def _kernels():
    from . import kernels  # imports triton

    _remember_kernels(kernels.KERNELS)
    return kernels


def _remember_kernels(kernels_list) -> None:
    """Let the AOTAutograd cache key include our kernel sources, as ``triton_op`` does."""
    try:
        from torch._library import triton as lib_triton
    except ImportError:  # pragma: no cover
        return
    for name in _OPS:
        lib_triton.triton_ops_to_kernels.setdefault(f"bitlab::{name}", list(kernels_list))


def _check_and_run(name: str, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                   act: str, static_multiplier: Optional[Tensor], in_features: int,
                   bias_codes: Optional[Tensor] = None, act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    packed = _OPS[name]
    extra = {} if in_features == -1 else {"in_features": in_features}
    _schema.check_linear(name, x, weight, weight_scale, bias, act, static_multiplier, packed, bias_codes=bias_codes,
                         act_bits=act_bits, bias_bits=bias_bits, **extra)
    k = _kernels()
    fn = k.ternary_linear_triton if packed else k.int8_linear_triton
    return fn(x, weight, weight_scale, bias, act, static_multiplier, bias_codes=bias_codes, act_bits=act_bits,
              bias_bits=bias_bits)


def _eager(name: str):
    def run(*args, **kwargs):
        from torch._library.triton import set_wrap_triton_enabled

        with set_wrap_triton_enabled(False):
            return _check_and_run(name, *_bind(name, args, kwargs))

    run.__name__ = f"{name}_cuda"
    return run


def _decompose(name: str):
    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        x = args[0] if args else kwargs.get("x")
        if (not isinstance(x, Tensor) or x.device.type != "cuda" or custom_triton_ops_decomposition_disabled()
                or os.environ.get("BITLAB_TRITON_DECOMPOSE", "1") == "0"):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        from torch._subclasses import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not Tensor for t in types):
            return NotImplemented
        with mode:
            return _check_and_run(name, *_bind(name, args, kwargs))

    return rule


_ARG_NAMES = {True: ("x", "packed_weight", "weight_scale", "bias", "act", "act_scale", "in_features", "act_multiplier",
                     "bias_codes", "act_bits", "bias_bits"),
              False: ("x", "weight", "weight_scale", "bias", "act", "act_scale", "act_multiplier", "bias_codes",
                      "act_bits", "bias_bits")}
_DEFAULTS = {"bias": None, "act": "per_token", "act_scale": None, "in_features": -1, "act_multiplier": None,
             "bias_codes": None, "act_bits": 8, "bias_bits": 0}


def _bind(name: str, args, kwargs):
    """``(x, weight, weight_scale, bias, act, static multiplier, in_features, bias_codes, act_bits, bias_bits)`` of a
    call, by the op's schema."""
    names = _ARG_NAMES[_OPS[name]]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    get = lambda n: bound[n] if n in bound else _DEFAULTS[n]  # noqa: E731
    multiplier = _schema.resolve_multiplier(name, get("act_scale"), get("act_multiplier"))
    return (get("x"), get(names[1]), get("weight_scale"), get("bias"), get("act"), multiplier, get("in_features"),
            get("bias_codes"), get("act_bits"), get("bias_bits"))


def register() -> None:
    """Register the CUDA kernels of the linear ops (idempotent; imports no triton)."""
    global _registered
    if _registered:
        return
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for name in _OPS:
        op = getattr(_schema, name)
        op.register_kernel("cuda", _eager(name))
        op.register_torch_dispatch(FunctionalTensorMode, _decompose(name))
    _registered = True


__all__ = ["autotune_enabled", "register", "set_autotune"]
