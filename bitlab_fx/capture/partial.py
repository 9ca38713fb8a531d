"""Partial capture: when ``torch.fx`` cannot trace a model whole, find its largest submodules that trace (checked
against a recorded call) and the supported layers whose parents do not (each becomes its own small graph).
Preparing those parts is :mod:`bitlab_fx.partial`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from ..errors import CaptureError
from ..passes._common import CONV_DIMS, CONV_FUNCTIONALS, META, LayerMeta
from ..passes.normalize import conv_call_args, explicit_padding, module_kind
from .fx import first_line, trace_fx


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
    return any(module_kind(m) is not None for m in module.modules())


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
               if _has_layer(m) and module_kind(m) is None]
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
    layers = {name for name, m in module.named_modules() if name and module_kind(m) is not None}
    outside = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.rpartition(".")[0] in layers]
    if outside:  # e.g. T5 reads wo.weight.dtype: after convert there is no float weight to read
        return None, f"the graph reads {outside[0]!r} outside its layer call (e.g. its dtype)"
    call = calls.get(id(module))
    reason = None if call is None else _mismatch(module, gm, call)
    return (None, reason) if reason else (gm, None)


def plan_partial(module: nn.Module, calls: Dict[int, tuple], path: str = "", plan: Optional[Plan] = None) -> Plan:
    """Top-down: trace the largest submodules that contain a supported layer and trace; recurse into the rest."""
    plan = Plan() if plan is None else plan
    if module_kind(module) is not None:
        plan.layers[path] = module
        return plan
    if not _has_layer(module) or isinstance(module, nn.MultiheadAttention):  # MHA reads out_proj.weight itself
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
    kind = module_kind(layer)
    g = fx.Graph()
    x = g.placeholder("input")
    w = g.get_attr("weight")
    b = g.get_attr("bias") if layer.bias is not None else None
    if kind in CONV_DIMS:
        padding = explicit_padding(layer)
        if padding is None or layer.padding_mode != "zeros":
            return None
        out = g.call_function(CONV_FUNCTIONALS[kind], (x, w, b) + conv_call_args(layer, padding))
    else:
        out = g.call_function(F.linear, (x, g.call_function(torch.t, (w,)) if kind == "conv1d_hf" else w, b))
    g.output(out)
    op = kind if kind in CONV_DIMS else "linear"
    out.meta[META] = LayerMeta(fqn="", object_type=CONV_FUNCTIONALS.get(op, F.linear), op=op, weight="weight",
                               bias=None if b is None else "bias", transposed=kind == "conv1d_hf")
    return keep_public_attributes(fx.GraphModule(layer, g, type(layer).__name__), layer)


# GraphModule's deepcopy sets the attributes kept under this key of ``meta`` again (pickling keeps them anyway)
_PRESERVED = getattr(torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


def keep_public_attributes(gm: fx.GraphModule, layer: nn.Module) -> fx.GraphModule:
    """Give ``gm`` the plain public attributes of the layer it replaces (``stride``, ``kernel_size``, ``padding``,
    ``in_features``, ...): eager model code reads them (Whisper's ``self.conv1.stride[0]``, MobileNetV2's TF-style
    padding). Tensors, modules and names a GraphModule uses itself are not copied. They survive deepcopy and pickling."""
    public = {k: v for k, v in vars(layer).items()
              if not k.startswith("_") and k != "training" and not hasattr(fx.GraphModule, k)
              and not isinstance(v, (torch.Tensor, nn.Module))}
    for k, v in public.items():
        setattr(gm, k, v)
    gm.meta.setdefault(_PRESERVED, {}).update(public)
    return gm
