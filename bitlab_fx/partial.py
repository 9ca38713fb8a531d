"""Automatic partial tracing: quantize models that ``torch.fx`` cannot trace whole (most Hugging Face models).
Which parts trace is decided by :mod:`bitlab_fx.capture.partial`; this module prepares and converts them.

The model keeps its class. Each largest submodule that traces is replaced by its prepared GraphModule;
untraceable parents stay ordinary modules, and a supported layer whose parent does not trace becomes
its own tiny prepared graph. Mapping rules see the original fully-qualified names
(``model.layers.0.self_attn.q_proj``). The root records what happened in ``model._bitlab_fx``::

    Record(stage="prepared" | "converted", qconfig=QConfigMapping, frontend="fx",
           parts={path: "graph" | "layer"}, untraced={path: first line of why}, float_layers={path: rule})

>>> import torch, bitlab_fx as bfx
>>> class Gate(torch.nn.Module):          # data-dependent control flow: torch.fx cannot trace it
...     def __init__(self):
...         super().__init__()
...         self.fc = torch.nn.Linear(8, 8)
...     def forward(self, x):
...         return self.fc(x) if x.sum() > 0 else x
>>> pm = bfx.prepare_qat(torch.nn.Sequential(Gate(), torch.nn.Linear(8, 2)), bfx.ternary())
>>> type(pm).__name__, sorted(bfx.summary(pm).traced.items())
('Sequential', [('0.fc', 'layer'), ('1', 'layer')])
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set

import torch
from torch import fx, nn

from .capture.partial import Plan, layer_graph, qualify
from .mapping import QConfigMapping
from .passes.fuse_siblings import fuse_lone_layers
from .passes._common import META, ROOT_ATTR, Record, bitlab_meta, layer_nodes, set_submodule
from .passes.normalize import normalize
from .passes.pipeline import convert_graph, prepare_graph
from .quant.fake_quant import FAKE_QUANT_TYPES


class ScopedMapping:
    """A mapping seen from inside one part: names are qualified with the part's path before resolving."""

    def __init__(self, mapping: QConfigMapping, prefix: str, used: Set, object_type: Any = None):
        self.mapping, self.prefix, self.used, self.object_type = mapping, prefix, used, object_type

    def resolve(self, fqn: str, object_type: Any):
        config, rule = self.mapping.resolve(qualify(self.prefix, fqn), self.object_type or object_type)
        if rule is not None:
            self.used.add(rule)
        return config, rule

    def matching_rules(self, fqn: Optional[str], object_types):
        return self.mapping.matching_rules(None if fqn is None else qualify(self.prefix, fqn), object_types)

    def warn_unused(self, used) -> None:  # collected here, warned once for the whole model by prepare_partial
        self.used.update(used)

    def __getattr__(self, name: str):  # anything else a pass asks of a mapping
        return getattr(self.mapping, name)


def _prepare_part(gm: fx.GraphModule, mapping: ScopedMapping, normalized: bool) -> fx.GraphModule:
    record = {"prefix": mapping.prefix, "frontend": "fx"}
    if mapping.object_type is not None:
        record["layer_type"] = mapping.object_type.__name__
    gm = prepare_graph(gm, mapping, record, normalizer=None if normalized else normalize)
    for m in gm.modules():
        if isinstance(m, FAKE_QUANT_TYPES):
            m.layer = qualify(mapping.prefix, m.layer)
    return gm


def prepare_partial(model: nn.Module, mapping: QConfigMapping, plan: Plan, root_reason: str) -> nn.Module:
    """Replace, in place, each planned part of ``model`` by its prepared graph; record it on the root."""
    used: Set = set()
    parts: Dict[str, str] = {}
    float_layers: Dict[str, str] = {}
    for path, gm in plan.graphs.items():
        set_submodule(model, path, _prepare_part(gm, ScopedMapping(mapping, path, used), normalized=False))
        parts[path] = "graph"
    for path, layer in plan.layers.items():
        config, rule = mapping.resolve(path, type(layer))
        used.update([rule] if rule is not None else [])
        gm = layer_graph(layer) if config is not None else None
        if gm is None:  # left float and untouched (e.g. a tied lm_head)
            float_layers[path] = "" if rule is None else str(rule)
            continue
        set_submodule(model, path, _prepare_part(gm, ScopedMapping(mapping, path, used, type(layer)), normalized=True))
        parts[path] = "layer"
    mapping.warn_unused(used)
    untraced = {"": root_reason, **plan.untraced}
    setattr(model, ROOT_ATTR, Record(stage="prepared", qconfig=mapping, frontend="fx", parts=parts,
                                     untraced=untraced, float_layers=float_layers))
    return model


def keep_float(model: nn.Module, path: str, layer: nn.Module, reason: str) -> None:
    """Put the float ``layer`` back at ``path`` of a prepared model (instead of its prepared graph), with ``reason``
    recorded for the summary."""
    record = bitlab_meta(model)
    set_submodule(model, path, layer)
    record.parts.pop(path, None)
    record.float_layers[path] = ""
    record.skipped[path] = reason


def convert_partial(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Lower every prepared part of a partially traced model, in place (``fuse``: see ``convert_graph``)."""
    record = bitlab_meta(model)
    for path in record.parts:
        gm = model.get_submodule(path)
        dtype = getattr(gm, "weight", None)
        dtype = dtype.dtype if torch.is_tensor(dtype) else None
        convert_graph(gm, fuse)
        if dtype is not None and not hasattr(gm, "weight"):
            # eager parents often read layer.weight.dtype/.device (HF ViT, T5): keep an empty stand-in
            gm.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)
        for node in layer_nodes(gm):
            meta = node.meta[META]
            if meta.container is not None:
                gm.get_submodule(meta.container).name = qualify(path, meta.fqn)
    if fuse:
        fuse_lone_layers(model, record.parts)
    record.stage = "converted"
    return model
