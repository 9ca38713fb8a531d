"""Pass 1 for ``frontend="export"``: bring a ``torch.export`` graph to the form the other passes use.

``aten.linear(x, get_attr[fc1.weight], get_attr[fc1.bias])`` becomes ``F.linear(...)`` (``aten.conv1d``/``conv2d``
-> ``F.conv1d``/``F.conv2d`` with explicit stride/padding/dilation/groups; an HF ``Conv1D``'s ``aten.addmm`` ->
``F.linear(x, torch.t(weight), bias)``) with a :class:`LayerMeta` whose ``fqn`` is the
original module's name from ``node.meta["nn_module_stack"]``, so mapping rules match as with fx.
``aten.dropout(x, p, train)`` becomes an ``nn.Dropout`` call (an attention's baked ``dropout_p`` an
:class:`AttentionDropout` call, ``aten.batch_norm(..., training, ...)`` a :class:`ModeBatchNorm` call on the same
statistics) so that ``.train()``/``.eval()`` switch it, and
the graph is re-wrapped as a plain GraphModule (``ExportedProgram.module()`` refuses ``.train()``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layer_kinds import BY_ATEN
from ._common import CONV_DIMS, META, RECORD_KEY, LayerMeta, Record, is_hf_conv1d, ntuple
from ..capture.modes import AttentionDropout, ModeBatchNorm, replace_with_module
from .normalize import module_kind, resolve_padding

aten = torch.ops.aten
# aten overload -> (functional, op), from the table of layer kinds (.padding overloads: "same"/"valid" padding)
_LAYERS = {overload: (kind.functional, kind.name) for overload, kind in BY_ATEN.items()}
_CONV_ARGS = ("stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (1, 0, 1, 1)


def _calling_module(node: fx.Node, model: nn.Module):
    """(path, module) of the innermost module whose forward produced ``node`` (``nn_module_stack``), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    try:
        return path, model.get_submodule(path)
    except AttributeError:
        return None


def _owner(node: fx.Node, model: nn.Module, weight: str) -> Optional[str]:
    """The module path whose nn.Linear/nn.Conv2d produced ``node``, when ``weight`` is that module's weight."""
    found = _calling_module(node, model)
    if found is None:
        return None
    path, module = found
    return path if weight == f"{path}.weight" and module_kind(module) in ("linear", *CONV_DIMS) else None


def _layer_meta(node: fx.Node, model: nn.Module, op: str, func) -> Optional[LayerMeta]:
    w = node.args[1] if len(node.args) > 1 else None
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr")):
        return None
    if op in CONV_DIMS:
        n = CONV_DIMS[op]
        given = dict(zip(_CONV_ARGS, node.args[3:]))
        given.update({k: v for k, v in node.kwargs.items() if k in _CONV_ARGS})
        rest = [given.get(k, d) for k, d in zip(_CONV_ARGS, _CONV_DEFAULTS)]
        if isinstance(rest[1], str):
            try:
                kernel = tuple(model.get_parameter(w.target).shape[2:])
            except AttributeError:
                return None
            rest[1] = resolve_padding(rest[1], kernel, rest[2])
            if rest[1] is None:
                return None
        node.args = (node.args[0], w, b, ntuple(rest[0], n), ntuple(rest[1], n), ntuple(rest[2], n), rest[3])
    else:
        node.args = (node.args[0], w, b)
    node.kwargs, node.target = {}, func
    path = _owner(node, model, w.target)
    if path is not None:
        return LayerMeta(fqn=path, object_type=type(model.get_submodule(path)), op=op, weight=w.target,
                         bias=None if b is None else b.target)
    fqn = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
    return LayerMeta(fqn=fqn, object_type=func, op=op, weight=w.target, bias=None if b is None else b.target)


def _hf_conv1d_meta(gm: fx.GraphModule, node: fx.Node, model: nn.Module) -> Optional[LayerMeta]:
    """HF GPT-2 ``Conv1D`` exports as ``addmm(bias, x2d, weight)`` with the weight stored ``[in, out]``: rewrite it
    to ``F.linear(x2d, torch.t(weight), bias)``, the form the fx frontend gives it (parameters unchanged)."""
    if len(node.args) != 3 or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
        return None
    b, x, w = node.args
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (b, w)):
        return None
    found = _calling_module(node, model)
    if found is None:
        return None
    path, module = found
    if not is_hf_conv1d(module) or w.target != f"{path}.weight" or b.target != f"{path}.bias":
        return None
    with gm.graph.inserting_before(node):
        wt = gm.graph.call_function(torch.t, (w,))
    node.target, node.args, node.kwargs = F.linear, (x, wt, b), {}
    return LayerMeta(fqn=path, object_type=type(module), op="linear", weight=w.target, bias=b.target, transposed=True)


def _dropout_to_module(gm: fx.GraphModule, node: fx.Node) -> None:
    replace_with_module(gm, node, "dropout", nn.Dropout(node.args[1]), (node.args[0],))


def _attention_dropout_to_module(gm: fx.GraphModule, node: fx.Node) -> None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    p = bound.pop("dropout_p", 0.0)
    if not isinstance(p, (int, float)) or p == 0:
        return
    q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
    replace_with_module(gm, node, "attention_dropout", AttentionDropout(float(p)), (q, k, v), bound)


_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")


def _batch_norm_to_module(gm: fx.GraphModule, node: fx.Node, model: nn.Module) -> None:
    """``aten.batch_norm(..., training=<mode at export>, ...)`` -> a :class:`ModeBatchNorm` call on the same tensors, with
    the exported ``num_batches_tracked += 1`` folded into it (counted in train mode only)."""
    bound = dict(zip(_BN_ARGS, node.args))
    bound.update(node.kwargs)
    rm, rv = bound.get("running_mean"), bound.get("running_var")
    stats = [t for t in (rm, rv) if t is not None]
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in stats):
        return
    momentum, eps = bound.get("momentum", 0.1), bound.get("eps", 1e-5)
    found = _calling_module(node, model)
    if found is not None and isinstance(found[1], nn.modules.batchnorm._BatchNorm):
        momentum, eps = found[1].momentum, found[1].eps
    counter = None
    if isinstance(rm, fx.Node) and rm.target.endswith("running_mean"):
        target = rm.target[: -len("running_mean")] + "num_batches_tracked"
        for other in list(gm.graph.nodes):
            if other.op == "get_attr" and other.target == target:
                counter = other
            elif (other.op == "call_function" and other.target is aten.add_.Tensor and other.args[0] is counter
                  and counter is not None and not other.users):
                gm.graph.erase_node(other)  # the module counts train-mode calls itself
        if counter is None and momentum is None:
            return  # cumulative average without its counter: leave as exported
    args = (bound["input"], bound.get("weight"), bound.get("bias"), rm, rv, counter)
    replace_with_module(gm, node, "batch_norm", ModeBatchNorm(momentum, eps), args)


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
    skipped = gm.meta.setdefault(RECORD_KEY, Record(stage="capturing")).skipped
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _LAYERS:
            func, op = _LAYERS[node.target]
            meta = _layer_meta(node, model, op, func)
            if meta is None:
                skipped[node.name] = (f"aten.{op} whose weight/bias are not parameters, or padding='same' with an even "
                                      "kernel span")
            else:
                node.meta[META] = meta
        elif node.target is aten.addmm.default:
            meta = _hf_conv1d_meta(gm, node, model)
            if meta is not None:
                node.meta[META] = meta
        elif node.target in (aten.dropout.default, aten.dropout_.default):
            _dropout_to_module(gm, node)
        elif node.target is aten.scaled_dot_product_attention.default:
            _attention_dropout_to_module(gm, node)
        elif node.target is aten.batch_norm.default:
            _batch_norm_to_module(gm, node, model)
    gm = _plain_graph_module(gm)
    gm.graph.lint()
    gm.recompile()
    return gm
