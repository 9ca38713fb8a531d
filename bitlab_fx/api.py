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
import sys
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import fx, nn

from .capture import check_example_inputs
from .errors import CaptureError, ConfigError, ConvertError
from .mapping import as_mapping
from .partial import convert_partial
from .passes.embeddings import convert_embeddings
from .passes.experts import convert_experts
from .passes._common import ROOT_ATTR, stage_of
from .passes.pipeline import convert_graph
from .pipeline import capture_export, capture_fx
from .quant.fake_quant import FAKE_QUANT_TYPES, set_fake_quant_enabled, set_observer

FRONTENDS = ("fx", "fx_whole", "export")


def prepare_qat(model: nn.Module, qconfig: Any, example_inputs: Optional[Tuple] = None, *,
                example_kwargs: Optional[Dict[str, Any]] = None, frontend: str = "fx",
                dynamic_shapes: Any = None) -> nn.Module:
    """Capture ``model`` and insert fake-quant nodes for quantization-aware training.

    ``qconfig`` is a :class:`QConfigMapping`, a single :class:`QuantConfig` applied to every supported
    layer, or a seed-style ``BitQuantConfig``. The input model is not modified; parameter names are
    kept, so a state_dict of the float model loads into the result. ``example_inputs`` (a tuple of
    positional inputs), if given, are run once through the prepared model to check that it works.

    ``example_kwargs``: keyword inputs of ``forward`` (a dict, e.g. ``{"attention_mask": mask}`` for a
    Hugging Face model), used wherever ``example_inputs`` are: the model is run as
    ``model(*example_inputs, **example_kwargs)``. With the fx frontends a parameter given here is traced as an
    input (a parameter that defaults to None and is given in neither is traced as the constant None); with
    ``"export"`` they go to ``torch.export.export(..., kwargs=)`` and their tensors get the same dynamic batch
    dim as positional ones. A key that is not a parameter of ``forward`` (unless it takes ``**kwargs``), or
    that ``example_inputs`` already fills, raises :class:`ConfigError`.

    ``frontend``: ``"fx"`` (default) returns an fx GraphModule when the whole model traces, else the
    model itself (same class) with its largest traceable parts replaced by prepared graphs (see
    :mod:`bitlab_fx.partial`; ``example_inputs`` are then also used to check each traced part);
    ``"fx_whole"`` raises :class:`CaptureError` instead of tracing partially; ``"export"`` captures with
    ``torch.export`` (non-strict; needs ``example_inputs``, takes ``dynamic_shapes``).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare_qat expects a torch.nn.Module, got {type(model).__name__}")
    if stage_of(model) is not None:
        raise ConfigError(f"prepare_qat: this model is already {stage_of(model)} by bitlab_fx; "
                          "pass the original float model")
    _check_no_quantized_parts(model)
    if frontend not in FRONTENDS:
        raise ConfigError(f"prepare_qat(frontend={frontend!r}): use one of {FRONTENDS}")
    example_inputs, example_kwargs = check_example_inputs(model, example_inputs, example_kwargs)
    mapping = as_mapping(qconfig)
    was_training = model.training
    if frontend == "export":  # export shares tensors: copy first
        gm = capture_export(copy.deepcopy(model), mapping, example_inputs, dynamic_shapes, example_kwargs)
    else:
        gm = capture_fx(copy.deepcopy(model), mapping, example_inputs, partial=frontend == "fx",
                        example_kwargs=example_kwargs)
    gm.train(was_training)
    if example_inputs is not None:
        _check_runs(gm, example_inputs, example_kwargs)
    return gm


def _quantized_part(module: nn.Module) -> Optional[str]:
    """Why ``module`` is already quantized by bitlab_fx ("prepared", "converted", a BitLinear), or None."""
    from .bitlab import BitLinear
    from .nn.quantized import _QuantizedBase

    if isinstance(module, BitLinear):
        return "an eager BitLinear (it quantizes itself)"
    stage = stage_of(module)
    if stage is not None:
        return f"already {stage} by bitlab_fx"
    if isinstance(module, _QuantizedBase):
        return "already converted by bitlab_fx (packed weights)"
    if isinstance(module, FAKE_QUANT_TYPES):
        return "a bitlab_fx fake quantizer (already prepared)"
    return None


def _check_no_quantized_parts(model: nn.Module) -> None:
    """A submodule prepared or converted on its own would be quantized a second time (or fail to trace)."""
    for name, module in model.named_modules():
        why = _quantized_part(module)
        if why is None:
            continue
        where = f"submodule {name!r}" if name else "the model"
        if why.startswith("an eager BitLinear"):
            raise ConfigError(f"prepare_qat: {where} is {why}; prepare_qat quantizes plain nn.Linear "
                              "layers: build the model with nn.Linear (a BitLinear state_dict loads into it) and "
                              "prepare that, or use the BitLinear model as it is without prepare_qat")
        if "converted" in why:
            raise ConfigError(f"prepare_qat: {where} ({type(module).__name__}) is {why}; a converted block "
                              "cannot be prepared again. Prepare the outer model once from the float model, or "
                              "prepare and convert the remaining float blocks separately, each with its own "
                              "bfx.prepare_qat(block, qconfig) / bfx.convert(block)")
        raise ConfigError(f"prepare_qat: {where} ({type(module).__name__}) is {why}; preparing the outer "
                          "model would quantize it twice. Either prepare the outer model once from the float model, "
                          "or keep the per-block flow: do not call prepare_qat on the outer model, train it as it "
                          "is, and convert each prepared block separately (block = bfx.convert(block))")


def _check_runs(gm: fx.GraphModule, example_inputs, example_kwargs: Optional[Dict[str, Any]] = None) -> None:
    if not isinstance(example_inputs, tuple):
        raise ConfigError(f"example_inputs must be a tuple of model inputs, e.g. (x,); got {type(example_inputs).__name__}")
    training = gm.training
    try:
        with torch.no_grad():
            gm.eval()(*example_inputs, **(example_kwargs or {}))
    except Exception as e:
        given = "example_inputs and example_kwargs" if example_kwargs else "example_inputs"
        raise CaptureError(f"the prepared model failed on {given}: {type(e).__name__}: {e}") from e
    finally:
        gm.train(training)


def convert(model: nn.Module, *, inplace: bool = False, fuse_siblings: bool = True) -> nn.Module:
    """Lower the fake-quant nodes of a prepared model to packed weights and ``torch.ops.bitlab`` calls.

    The converted model computes what the prepared model computes in eval mode; only packed weights
    and scales are kept. Returns a copy unless ``inplace=True``, of the same kind as given (a
    GraphModule, or the partially traced model with its class).

    ``fuse_siblings``: converted linear layers that read the same input with the same format and activation
    quantization (q/k/v projections, gate/up of a gated MLP, where they are in one traced graph) run as one
    op call on their concatenated rows; the layers keep their names, modules and state_dict keys, and the
    outputs are the same (:mod:`bitlab_fx.passes.fuse_siblings`). ``False`` keeps one call per layer.
    """
    _check_not_wrapped(model)
    stage = stage_of(model)
    if stage == "converted":
        raise ConvertError("convert: this model is already converted; convert the prepared model "
                           "(the result of bfx.prepare_qat) once")
    partial = not isinstance(model, fx.GraphModule) and ROOT_ATTR in model.__dict__
    if stage != "prepared" or not (isinstance(model, fx.GraphModule) or partial):
        has_fq = any(isinstance(m, FAKE_QUANT_TYPES) for m in model.modules())
        raise ConvertError(f"convert: the {type(model).__name__} was not prepared with bfx.prepare_qat "
                           f"({'its fake-quant modules were found outside a prepared graph' if has_fq else 'no fake-quant nodes found'}); "
                           "call model = bfx.prepare_qat(model, qconfig) first, then train, then convert")
    _warn_not_fully_quantizing(model)
    gm = model if inplace else copy.deepcopy(model)
    if partial:
        gm = convert_experts(convert_embeddings(convert_partial(gm, fuse_siblings)))
        if callable(getattr(gm, "save_pretrained", None)):  # a Hugging Face model, converted in place
            gm.save_pretrained = _SavePretrainedUnsupported(type(gm).__name__)
        return gm
    return convert_experts(convert_embeddings(convert_graph(gm, fuse_siblings)))


class _SavePretrainedUnsupported:
    """Stands in for ``save_pretrained`` on a converted Hugging Face model: its packed layers cannot be written
    (or read back by ``from_pretrained``) as a float checkpoint."""

    def __init__(self, cls_name: str):
        self.cls_name = cls_name

    def __call__(self, *args, **kwargs):
        raise ConvertError(f"save_pretrained: this {self.cls_name} is converted by bitlab_fx (packed weights), which "
                           "Hugging Face checkpoints cannot hold; save it with bfx.save_quantized(model, "
                           "'model.safetensors') and load it with bfx.load_quantized(<float model, e.g. "
                           "from_config(config)>, 'model.safetensors'); model.config.save_pretrained(dir) saves the "
                           "config. (save_pretrained works on the prepared model: a float checkpoint.)")


def _warn_not_fully_quantizing(model: nn.Module) -> None:
    """convert always packs fully quantized layers: say so when fake quant is off or mid warm-up right now."""
    quantizers = [m for m in model.modules() if isinstance(m, FAKE_QUANT_TYPES)]
    disabled = [m for m in quantizers if not m.enabled]
    mixed = [m for m in quantizers if m.enabled and m.mix < 1.0]
    if not disabled and not mixed:
        return
    names = lambda ms: ", ".join(repr(n) for n in list(dict.fromkeys(m.layer for m in ms))[:5]) + (", ..." if len(
        {m.layer for m in ms}) > 5 else "")
    parts = []
    if disabled:
        parts.append(f"{len(disabled)} of {len(quantizers)} fake quantizers are disabled (layers {names(disabled)}; "
                     "bfx.disable_fake_quant)")
    if mixed:
        mixes = sorted({round(float(m.mix), 4) for m in mixed})
        parts.append(f"{len(mixed)} of {len(quantizers)} fake quantizers are mid warm-up (mix {', '.join(map(str, mixes))} < 1; "
                     f"layers {names(mixed)}; bfx.QuantWarmup)")
    warnings.warn(f"bitlab_fx convert: {' and '.join(parts)}. The converted model is fully quantized, so its outputs "
                  "will differ from the prepared model's current outputs; to compare or evaluate the same thing, call "
                  "bfx.enable_fake_quant(model) and finish the warm-up (mix = 1) before converting",
                  UserWarning, stacklevel=3)


def _check_not_wrapped(model: nn.Module) -> None:
    """DDP wrappers and FSDP2-sharded models cannot be converted as they are; say what to do instead."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ConvertError("convert: got a DistributedDataParallel wrapper; convert the prepared model it wraps: "
                           "bfx.convert(ddp_model.module)")
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)  # not imported: not FSDP
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        raise ConvertError("convert: the model is sharded with FSDP2 (fully_shard), its parameters are DTensor "
                           "shards; gather a full state dict (torch.distributed.checkpoint.state_dict."
                           "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))), load it "
                           "into an unsharded prepared model (bfx.prepare_qat of the same float model) and convert that")


def disable_fake_quant(model: nn.Module) -> nn.Module:
    """Make every fake-quant module of a prepared model the identity (float training/eval)."""
    return set_fake_quant_enabled(model, False)


def enable_fake_quant(model: nn.Module) -> nn.Module:
    """Undo :func:`disable_fake_quant`."""
    return set_fake_quant_enabled(model, True)


def disable_observer(model: nn.Module) -> nn.Module:
    """Freeze the running ranges of static activation quantizers (e.g. for the last epochs of QAT)."""
    return set_observer(model, False)


def enable_observer(model: nn.Module) -> nn.Module:
    """Undo :func:`disable_observer`."""
    return set_observer(model, True)
