"""Quantize once, load many: save a converted model's packed weights and rebuild it on a fresh float model.

``save_quantized(model, path)`` writes one safetensors file: every tensor of the converted model's
state_dict (packed weights, scales, biases and the float layers such as embeddings and norms), with a
JSON header holding the mapping (``QConfigMapping.to_dict``), the file and packing format versions, the
traced parts and the converted layers' extra state. ``load_quantized(model, path)`` takes a freshly
built float model of the same architecture (e.g. ``AutoModelForCausalLM.from_config(config)``), rebuilds
the converted structure in place (capture + convert, no training, no copy of the model) and loads the
tensors. Needs the ``safetensors`` package (``pip install bitlab-fx[hf]``).

>>> import torch, tempfile, os, bitlab_fx as bfx
>>> make = lambda: torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> cm = bfx.convert(bfx.prepare_qat(make(), bfx.ternary()).eval())
>>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
>>> bfx.save_quantized(cm, path)
>>> loaded = bfx.load_quantized(make(), path)
>>> x = torch.randn(2, 16)
>>> torch.equal(loaded(x), cm(x))
True
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .api import convert
from .capture import check_example_inputs
from .errors import BitlabError, ConfigError, ConvertError
from .mapping import QConfigMapping
from .nn.quantized import _QuantizedBase, upgrade_legacy_keys
from .passes._common import bitlab_meta, stage_of
from .pipeline import capture_fx
from .quant.packing import FORMAT_VERSION

FILE_FORMAT = "bitlab_fx.quantized"
FILE_VERSION = 2  # 2: static multipliers are "<layer>.act_multiplier" / "<quantizer>_multiplier" (were
#                  "<layer>.act_scale_static" / "<quantizer>_scale")
READABLE_FILE_VERSIONS = (1, 2)  # version 1 files load: their keys are renamed (nn.quantized.upgrade_legacy_keys)
_HEADER_KEY = "bitlab_fx"
_EXTRA = "_extra_state"


def _safetensors():
    try:
        import safetensors.torch
        return safetensors
    except ImportError:
        raise BitlabError("save_quantized/load_quantized need the safetensors package: "
                          "pip install safetensors (or pip install bitlab-fx[hf])") from None


def _split_state(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], Dict[str, Any]]:
    """(tensors with shared storage saved once, aliases {key: saved key}, extra states {key: json-able})."""
    tensors, aliases, extras, seen = {}, {}, {}, {}
    for key, value in model.state_dict().items():
        if key.endswith(_EXTRA):
            extras[key] = value
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() and ident in seen:  # tied weights (e.g. lm_head and the token embedding)
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().contiguous().cpu()
    return tensors, aliases, extras


def save_quantized(model: nn.Module, path: str) -> None:
    """Write the converted ``model`` (result of :func:`bitlab_fx.convert`, fx frontend) to ``path`` (safetensors)."""
    record = bitlab_meta(model)
    if stage_of(model) != "converted":
        state = {"prepared": "only prepared", None: "a float model (not prepared)"}.get(stage_of(model), stage_of(model))
        raise ConvertError(f"save_quantized: the {type(model).__name__} is {state}, not converted; call "
                           "model = bfx.convert(model) first (or torch.save a prepared model's state_dict)")
    if record.frontend == "export":
        raise ConvertError("save_quantized: models prepared with frontend='export' are saved with "
                           "torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')")
    tensors, aliases, extras = _split_state(model)
    header = {"format": FILE_FORMAT, "file_version": FILE_VERSION, "packing_version": FORMAT_VERSION,
              "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
              "mapping": record.qconfig.to_dict(), "parts": record.parts,
              "aliases": aliases, "extra_states": extras}
    _safetensors().torch.save_file(tensors, path, metadata={_HEADER_KEY: json.dumps(header)})


def read_header(path: str) -> dict:
    """The JSON header of a file written by :func:`save_quantized`, with its versions checked."""
    st = _safetensors()
    with st.safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(_HEADER_KEY)
    header = json.loads(raw) if raw else {}
    if header.get("format") != FILE_FORMAT:
        raise ConvertError(f"load_quantized: {path!r} was not written by bfx.save_quantized (no bitlab_fx header)")
    if header.get("file_version") not in READABLE_FILE_VERSIONS or header.get("packing_version") != FORMAT_VERSION:
        raise ConvertError(f"load_quantized: {path!r} has file format {header.get('file_version')} / packing format "
                           f"{header.get('packing_version')}, this bitlab_fx reads {FILE_VERSION} / {FORMAT_VERSION}; "
                           "re-run bfx.save_quantized with this version (or install the bitlab_fx that wrote it)")
    return header


def _check_shapes(model: nn.Module, state: Dict[str, Any], path: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConvertError(f"load_quantized: {path!r} does not fit this {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; build the float model with the same architecture/config "
                           "that was quantized")
    for key, value in own.items():
        if torch.is_tensor(value) and tuple(value.shape) != tuple(state[key].shape):
            raise ConvertError(f"load_quantized: {key!r} has shape {tuple(state[key].shape)} in {path!r} but "
                               f"{tuple(value.shape)} in this model; build the float model with the config that was quantized")


def _upgrade_version_1(model: nn.Module, state: Dict[str, Any]) -> None:
    """Version 1 names: a layer's static multiplier ``<layer>.act_scale_static`` (now ``act_multiplier``) and a
    lowered quantizer's ``<name>_scale`` (now ``<name>_multiplier``): renamed in place."""
    for name, module in model.named_modules():
        if isinstance(module, _QuantizedBase):
            upgrade_legacy_keys(state, f"{name}." if name else "")
    for key in model.state_dict():
        old = key[: -len("_multiplier")] + "_scale" if key.endswith("_multiplier") else None
        if old is not None and key not in state and old in state:
            state[key] = state.pop(old)


def load_quantized(model: nn.Module, path: str, example_inputs: Optional[tuple] = None, *,
                   example_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Rebuild the converted structure on the float ``model`` and load ``path``; returns the converted model
    (``model`` itself, modified in place, when it is partially traced; a GraphModule sharing its modules otherwise).

    ``example_inputs``/``example_kwargs`` are only needed if they were used to prepare the saved model and changed
    what traced (e.g. a ``mask`` given in ``example_kwargs`` is traced as an input, not as None)."""

    if stage_of(model) is not None:
        raise ConfigError(f"load_quantized: the {type(model).__name__} is already {stage_of(model)} by bitlab_fx; "
                          "pass a freshly built float model (e.g. AutoModelForCausalLM.from_config(config))")
    example_inputs, example_kwargs = check_example_inputs(model, example_inputs, example_kwargs, "load_quantized")
    header = read_header(path)
    mapping = QConfigMapping.from_dict(header["mapping"])
    with torch.no_grad():
        prepared = capture_fx(model, mapping, example_inputs, partial=True, example_kwargs=example_kwargs)
    parts = bitlab_meta(prepared).parts
    if parts != header.get("parts"):
        def describe(p):
            return f"parts {p}" if p else "one whole graph"

        raise ConvertError(f"load_quantized: this {type(model).__name__} traces into {describe(parts)} but {path!r} was "
                           f"saved from {describe(header.get('parts'))}; pass the same example_inputs (and example_kwargs) "
                           "as prepare_qat got, or the same model")
    converted = convert(prepared.eval(), inplace=True)
    state: Dict[str, Any] = dict(_safetensors().torch.load_file(path))
    state.update({alias: state[key] for alias, key in header["aliases"].items()})
    state.update(header["extra_states"])
    if header["file_version"] == 1:  # files written before two keys were renamed still load
        _upgrade_version_1(converted, state)
    _check_shapes(converted, state, path)
    converted.load_state_dict(state, strict=True)
    return converted
