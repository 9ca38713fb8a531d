"""Which modules count as a layer kind's plain form, and why a layer-like module does not.

A module is quantized as a layer of its kind (``layer_kinds.LAYER_KINDS``) when it is an instance of the kind's
module (``nn.Linear``...) and computes what that module computes:

- a subclass that keeps the module's ``forward`` does;
- an ``nn.Linear`` subclass that overrides ``forward`` (Falcon's ``FalconLinear``: ``x @ self.weight.T + bias``)
  does when its forward equals ``F.linear`` on a random input (checked once per class, before tracing); one
  that does not is left float with a warning, and ``bfx.summary`` says why;
- a module whose ``weight`` is computed by ``torch.nn.utils.parametrize`` (weight norm, as in wav2vec2's
  positional conv) does not: it stays float, with the reason.

>>> import torch
>>> class ScaledLinear(torch.nn.Linear):          # not a plain linear map
...     def forward(self, x):
...         return 2 * super().forward(x)
>>> float_reason(torch.nn.Linear(4, 4)) is None
True
>>> import warnings
>>> with warnings.catch_warnings(record=True):
...     print(float_reason(ScaledLinear(4, 4)))
ScaledLinear overrides nn.Linear.forward with something that is not a plain linear map (checked on a random input): left float
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

_PLAIN_SUBCLASS: Dict[type, bool] = {}  # nn.Linear subclass with its own forward -> is it a plain linear map


def _computes_linear(module: nn.Linear) -> bool:
    """``module``'s forward equals ``F.linear`` on a random input (called without ``__call__``: no hooks, and
    safe while a tracer patches ``Module.__call__``)."""
    w = module.weight
    if not isinstance(w, torch.Tensor) or w.device.type == "meta" or w.dim() != 2:
        return False
    x = torch.randn(3, w.shape[1], dtype=w.dtype, device=w.device, generator=torch.Generator().manual_seed(0)) \
        if w.device.type == "cpu" else torch.randn(3, w.shape[1], dtype=w.dtype, device=w.device)
    try:
        with torch.no_grad():
            got = type(module).forward(module, x)
            ref = F.linear(x, w, module.bias)
    except Exception:
        return False
    return torch.is_tensor(got) and got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-3, atol=1e-5)


def plain_subclass(module: nn.Module, base: type) -> bool:
    """``module`` (an instance of ``base``, a layer kind's module) computes what ``base`` computes."""
    if type(module).forward is base.forward:
        return True
    if base is not nn.Linear:
        return False
    cls = type(module)
    if cls not in _PLAIN_SUBCLASS:
        _PLAIN_SUBCLASS[cls] = _computes_linear(module)
        if not _PLAIN_SUBCLASS[cls]:
            warnings.warn(f"bitlab_fx: {cls.__name__} subclasses nn.Linear but its forward is not a plain linear map "
                          "(checked on a random input): its layers stay float (bfx.summary lists them). Make its "
                          "forward F.linear(x, self.weight, self.bias) to quantize them", UserWarning, stacklevel=2)
    return _PLAIN_SUBCLASS[cls]


def is_parametrized(module: nn.Module) -> bool:
    """``module.weight`` (or ``bias``) is computed by ``torch.nn.utils.parametrize`` (weight norm, ...)."""
    return parametrize.is_parametrized(module, "weight") or parametrize.is_parametrized(module, "bias")


PARAMETRIZED = ("its weight is parametrized (torch.nn.utils.parametrize, e.g. weight norm): left float; to quantize "
                "it, fold the parametrization into a plain weight first: torch.nn.utils.parametrize."
                "remove_parametrizations(module, 'weight') on the float model")


def float_reason(module: nn.Module) -> Optional[str]:
    """Why a module of a supported layer type is not quantized as that layer, or None when it is (or is not one)."""
    from ..layer_kinds import LAYER_KINDS

    kind = next((k for k in LAYER_KINDS.values() if isinstance(module, k.module)), None)
    if kind is None:
        return None
    if is_parametrized(module):
        return PARAMETRIZED
    if not plain_subclass(module, kind.module):
        what = "a plain linear map (checked on a random input)" if kind.module is nn.Linear else "the plain layer"
        return (f"{type(module).__name__} overrides nn.{kind.module.__name__}.forward with something that is not "
                f"{what}: left float")
    return None
