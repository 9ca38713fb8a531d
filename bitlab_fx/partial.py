"""Automatic partial tracing: quantize models that ``torch.fx`` cannot trace whole (most Hugging Face models).

The model keeps its class. Each largest submodule that traces is replaced by its prepared GraphModule;
untraceable parents stay ordinary modules, and a supported layer whose parent does not trace becomes
its own tiny prepared graph. Mapping rules see the original fully-qualified names
(``model.layers.0.self_attn.q_proj``). The root records what happened in ``model._bitlab_fx``::

    {"stage": "prepared" | "converted", "qconfig": QConfigMapping, "frontend": "fx",
     "parts": {path: "graph" | "layer"}, "untraced": {path: first line of why}, "float_layers": {path: rule}}

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

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Set

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from .capture import first_line, trace_fx
from .errors import CaptureError
from .mapping import QConfigMapping
from .passes._common import (
    CONV_DIMS,
    CONV_FUNCTIONALS,
    META,
    ROOT_ATTR,
    LayerMeta,
    layer_nodes,
    set_submodule,
)
from .passes.normalize import _explicit_padding, _module_kind, conv_call_args, normalize
from .passes.pipeline import convert_graph, prepare_graph
from .quant.fake_quant import FAKE_QUANT_TYPES


def qualify(prefix: str, name: str) -> str:
    """``model.layers.0.mlp`` + ``gate_proj`` -> ``model.layers.0.mlp.gate_proj`` (either may be empty)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


@dataclass
class Plan:
    """What to trace: graphs (path -> traced, not yet normalized), lone layers, and why the rest did not trace."""

    graphs: Dict[str, fx.GraphModule] = field(default_factory=dict)
    layers: Dict[str, nn.Module] = field(default_factory=dict)
    untraced: Dict[str, str] = field(default_factory=dict)


def _has_layer(module: nn.Module) -> bool:
    return any(_module_kind(m) is not None for m in module.modules())


def record_calls(model: nn.Module, example_inputs: Optional[tuple],
                 example_kwargs: Optional[dict] = None) -> Dict[int, tuple]:
    """Run ``model(*example_inputs, **example_kwargs)`` once (eval, no grad) and keep the first ``(args, kwargs)``
    of each module."""
    calls: Dict[int, tuple] = {}
    if example_inputs is None and not example_kwargs:
        return calls

    def hook(module, args, kwargs):
        calls.setdefault(id(module), (args, kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if _has_layer(m) and _module_kind(m) is None]
    try:
        with torch.no_grad():
            model(*(example_inputs or ()), **(example_kwargs or {}))
    except Exception as e:
        given = "example_inputs and example_kwargs" if example_kwargs else "example_inputs"
        raise CaptureError(f"the float {type(model).__name__} failed on {given}: {first_line(e)}") from e
    finally:
        for h in handles:
            h.remove()
    return calls


def _mismatch(module: nn.Module, gm: fx.GraphModule, call: tuple) -> Optional[str]:
    """Why the traced graph is not the module (on the recorded call), or None when outputs agree."""
    args, kwargs = call
    try:
        with torch.no_grad():
            ref, got = tree_flatten(module(*args, **kwargs))[0], tree_flatten(gm(*args, **kwargs))[0]
    except Exception as e:
        return f"the traced graph fails on the recorded call: {first_line(e)}"
    same = len(ref) == len(got) and all(
        (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.allclose(a, b, atol=1e-5))
        or (not torch.is_tensor(a) and a == b) for a, b in zip(ref, got))
    return None if same else "the traced graph differs from eager forward on example_inputs (control flow baked in)"


def short_reason(reason: str, limit: int = 140) -> str:
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _try_trace(module: nn.Module, calls: Dict[int, tuple]):
    """(GraphModule, None) when ``module`` traces faithfully, else (None, first line of why not)."""
    try:
        gm = trace_fx(module)
    except CaptureError as e:
        return None, short_reason(first_line(e.__cause__ or e))
    dropped = sorted(set(module.state_dict()) - set(gm.state_dict()))
    if dropped:
        return None, f"tracing would drop {dropped[:3]} (not used by forward)"
    layers = {name for name, m in module.named_modules() if name and _module_kind(m) is not None}
    outside = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.rpartition(".")[0] in layers]
    if outside:  # e.g. T5 reads wo.weight.dtype: after convert there is no float weight to read
        return None, f"the graph reads {outside[0]!r} outside its layer call (e.g. its dtype)"
    call = calls.get(id(module))
    reason = None if call is None else _mismatch(module, gm, call)
    return (None, reason) if reason else (gm, None)


def plan_partial(module: nn.Module, calls: Dict[int, tuple], path: str = "", plan: Optional[Plan] = None) -> Plan:
    """Top-down: trace the largest submodules that contain a supported layer and trace; recurse into the rest."""
    plan = Plan() if plan is None else plan
    if _module_kind(module) is not None:
        plan.layers[path] = module
        return plan
    if not _has_layer(module):
        return plan
    if path and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        gm, reason = _try_trace(module, calls)
        if gm is not None:
            plan.graphs[path] = gm
            return plan
        plan.untraced[path] = reason
    for name, child in module.named_children():
        plan_partial(child, calls, qualify(path, name), plan)
    return plan


def layer_graph(layer: nn.Module) -> Optional[fx.GraphModule]:
    """A supported layer as its own normalized graph: ``F.linear``/``F.conv1d``/``F.conv2d`` on its own
    ``weight``/``bias``.

    Parameters stay at ``weight``/``bias`` (so ``<path>.weight`` keeps its name and shape)."""
    kind = _module_kind(layer)
    g = fx.Graph()
    x = g.placeholder("input")
    w = g.get_attr("weight")
    b = g.get_attr("bias") if layer.bias is not None else None
    if kind in CONV_DIMS:
        padding = _explicit_padding(layer)
        if padding is None or layer.padding_mode != "zeros":
            return None
        out = g.call_function(CONV_FUNCTIONALS[kind], (x, w, b) + conv_call_args(layer, padding))
    else:
        out = g.call_function(F.linear, (x, g.call_function(torch.t, (w,)) if kind == "conv1d_hf" else w, b))
    g.output(out)
    op = kind if kind in CONV_DIMS else "linear"
    out.meta[META] = LayerMeta(fqn="", object_type=CONV_FUNCTIONALS.get(op, F.linear), op=op, weight="weight",
                               bias=None if b is None else "bias", transposed=kind == "conv1d_hf")
    return fx.GraphModule(layer, g, type(layer).__name__)


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
    setattr(model, ROOT_ATTR, {"stage": "prepared", "qconfig": mapping, "frontend": "fx", "parts": parts,
                               "untraced": untraced, "float_layers": float_layers})
    return model


def convert_partial(model: nn.Module) -> nn.Module:
    """Lower every prepared part of a partially traced model, in place."""
    record = getattr(model, ROOT_ATTR)
    for path in record["parts"]:
        gm = model.get_submodule(path)
        dtype = getattr(gm, "weight", None)
        dtype = dtype.dtype if torch.is_tensor(dtype) else None
        convert_graph(gm)
        if dtype is not None and not hasattr(gm, "weight"):
            # eager parents often read layer.weight.dtype/.device (HF ViT, T5): keep an empty stand-in
            gm.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)
        for node in layer_nodes(gm):
            meta = node.meta[META]
            if meta.container is not None:
                gm.get_submodule(meta.container).name = qualify(path, meta.fqn)
    record["stage"] = "converted"
    return model
