"""Pass 1 for ``frontend="export"``: bring a ``torch.export`` graph to the form the other passes use.

``aten.linear(x, get_attr[fc1.weight], get_attr[fc1.bias])`` becomes ``F.linear(...)`` (``aten.conv2d`` ->
``F.conv2d`` with explicit stride/padding/dilation/groups) with a :class:`LayerMeta` whose ``fqn`` is the
original module's name from ``node.meta["nn_module_stack"]``, so mapping rules match as with fx.
``aten.dropout(x, p, train)`` becomes an ``nn.Dropout`` call so that ``.train()``/``.eval()`` switch it, and
the graph is re-wrapped as a plain GraphModule (``ExportedProgram.module()`` refuses ``.train()``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._common import META, LayerMeta, unique_name
from .normalize import _module_kind, _pair

aten = torch.ops.aten
_LAYERS = {aten.linear.default: (F.linear, "linear"), aten.conv2d.default: (F.conv2d, "conv2d")}
_CONV_ARGS = ("stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = ((1, 1), (0, 0), (1, 1), 1)


def _owner(node: fx.Node, model: nn.Module, weight: str) -> Optional[str]:
    """The module path whose nn.Linear/nn.Conv2d produced ``node``, when ``weight`` is that module's weight."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return path if weight == f"{path}.weight" and _module_kind(module) in ("linear", "conv2d") else None


def _layer_meta(node: fx.Node, model: nn.Module, op: str, func) -> Optional[LayerMeta]:
    w = node.args[1] if len(node.args) > 1 else None
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr")):
        return None
    if op == "conv2d":
        given = dict(zip(_CONV_ARGS, node.args[3:]))
        given.update({k: v for k, v in node.kwargs.items() if k in _CONV_ARGS})
        rest = [given.get(k, d) for k, d in zip(_CONV_ARGS, _CONV_DEFAULTS)]
        if isinstance(rest[1], str):
            return None
        node.args = (node.args[0], w, b, _pair(rest[0]), _pair(rest[1]), _pair(rest[2]), rest[3])
    else:
        node.args = (node.args[0], w, b)
    node.kwargs, node.target = {}, func
    path = _owner(node, model, w.target)
    if path is not None:
        return LayerMeta(fqn=path, object_type=type(model.get_submodule(path)), op=op, weight=w.target,
                         bias=None if b is None else b.target)
    fqn = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
    return LayerMeta(fqn=fqn, object_type=func, op=op, weight=w.target, bias=None if b is None else b.target)


def _dropout_to_module(gm: fx.GraphModule, node: fx.Node) -> None:
    x, p = node.args[0], node.args[1]
    name = unique_name(gm, "dropout")
    gm.add_submodule(name, nn.Dropout(p))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x,))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """The same graph in an ordinary GraphModule (train/eval allowed), keeping the pytree in/out specs."""
    out = fx.GraphModule(gm, gm.graph, type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    out.meta.update(gm.meta)
    return out


def normalize_export(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Rewrite aten layer calls of an exported graph to functional form with LayerMeta (``model``: the float model)."""
    skipped = gm.meta.setdefault("bitlab_fx", {}).setdefault("skipped", {})
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _LAYERS:
            func, op = _LAYERS[node.target]
            meta = _layer_meta(node, model, op, func)
            if meta is None:
                skipped[node.name] = f"aten.{op} whose weight/bias are not parameters, or string padding"
            else:
                node.meta[META] = meta
        elif node.target in (aten.dropout.default, aten.dropout_.default):
            _dropout_to_module(gm, node)
    gm = _plain_graph_module(gm)
    gm.graph.lint()
    gm.recompile()
    return gm
