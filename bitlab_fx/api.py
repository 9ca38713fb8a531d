"""``prepare_qat`` and ``convert``: capture the model, then run the passes in order.

>>> import torch, bitlab_fx as bfx
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> pm = bfx.prepare_qat(model, bfx.ternary())
>>> cm = bfx.convert(pm.eval())
>>> cm(torch.randn(2, 16)).shape
torch.Size([2, 4])
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Tuple

import torch
from torch import fx, nn

from .capture import trace_fx
from .errors import CaptureError, ConfigError, ConvertError
from .mapping import as_mapping
from .passes._common import STAGE, stage_of
from .passes.insert_fake_quant import insert_fake_quant
from .passes.lower_to_packed import lower_to_packed
from .passes.normalize import normalize
from .quant.fake_quant import FAKE_QUANT_TYPES, set_fake_quant_enabled

FRONTENDS = ("fx",)


def prepare_qat(model: nn.Module, qconfig: Any, example_inputs: Optional[Tuple] = None, *,
                frontend: str = "fx") -> fx.GraphModule:
    """Capture ``model`` and insert fake-quant nodes for quantization-aware training.

    ``qconfig`` is a :class:`QConfigMapping`, a single :class:`QuantConfig` applied to every supported
    layer, or a seed-style ``BitQuantConfig``. The input model is not modified; parameter names are
    kept, so a state_dict of the float model loads into the result. ``example_inputs``, if given, are
    run once through the prepared model to check that it works.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare_qat expects a torch.nn.Module, got {type(model).__name__}")
    if stage_of(model) is not None:
        raise ConfigError(f"prepare_qat: this model is already {stage_of(model)} by bitlab_fx; "
                          "pass the original float model")
    if frontend not in FRONTENDS:
        raise ConfigError(f"prepare_qat(frontend={frontend!r}): use one of {FRONTENDS}")
    mapping = as_mapping(qconfig)
    was_training = model.training
    gm = trace_fx(copy.deepcopy(model))
    gm.meta[STAGE] = {"stage": "capturing", "qconfig": mapping, "frontend": frontend}
    gm = normalize(gm)
    gm = insert_fake_quant(gm, mapping)
    gm.meta[STAGE]["stage"] = "prepared"
    gm.train(was_training)
    if example_inputs is not None:
        _check_runs(gm, example_inputs)
    return gm


def _check_runs(gm: fx.GraphModule, example_inputs) -> None:
    if not isinstance(example_inputs, tuple):
        raise ConfigError(f"example_inputs must be a tuple of model inputs, e.g. (x,); got {type(example_inputs).__name__}")
    training = gm.training
    try:
        with torch.no_grad():
            gm.eval()(*example_inputs)
    except Exception as e:
        raise CaptureError(f"the prepared model failed on example_inputs: {type(e).__name__}: {e}") from e
    finally:
        gm.train(training)


def convert(model: nn.Module, *, inplace: bool = False) -> fx.GraphModule:
    """Lower the fake-quant nodes of a prepared model to packed weights and ``torch.ops.bitlab`` calls.

    The converted model computes what the prepared model computes in eval mode; only packed weights
    and scales are kept. Returns a copy unless ``inplace=True``.
    """
    stage = stage_of(model)
    if stage == "converted":
        raise ConvertError("convert: this model is already converted; convert the prepared model "
                           "(the result of bfx.prepare_qat) once")
    if stage != "prepared" or not isinstance(model, fx.GraphModule):
        has_fq = any(isinstance(m, FAKE_QUANT_TYPES) for m in model.modules())
        raise ConvertError(f"convert: the {type(model).__name__} was not prepared with bfx.prepare_qat "
                           f"({'its fake-quant modules were found outside a prepared graph' if has_fq else 'no fake-quant nodes found'}); "
                           "call model = bfx.prepare_qat(model, qconfig) first, then train, then convert")
    gm = model if inplace else copy.deepcopy(model)
    gm = lower_to_packed(gm)
    gm.meta[STAGE]["stage"] = "converted"
    return gm


def disable_fake_quant(model: nn.Module) -> nn.Module:
    """Make every fake-quant module of a prepared model the identity (float training/eval)."""
    return set_fake_quant_enabled(model, False)


def enable_fake_quant(model: nn.Module) -> nn.Module:
    """Undo :func:`disable_fake_quant`."""
    return set_fake_quant_enabled(model, True)


def disable_observer(model: nn.Module) -> nn.Module:
    """Freeze the running ranges of static activation quantizers (e.g. for the last epochs of QAT)."""
    for m in model.modules():
        if isinstance(m, FAKE_QUANT_TYPES) and hasattr(m, "observe"):
            m.observe = False
    return model


def enable_observer(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, FAKE_QUANT_TYPES) and hasattr(m, "observe"):
            m.observe = True
    return model
