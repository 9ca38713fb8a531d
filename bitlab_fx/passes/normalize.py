"""Pass 1: bring every supported layer to one form, whatever captured it.

``call_module[fc1](x)`` on an ``nn.Linear`` becomes ``call_function[F.linear](x, get_attr[fc1.weight],
get_attr[fc1.bias])`` (``nn.Conv1d``/``nn.Conv2d`` likewise become ``F.conv1d``/``F.conv2d`` with explicit
stride/padding/dilation/groups), and ``F.linear``/``F.conv1d``/``F.conv2d`` calls on module parameters are
recognised as they are.
Each such node gets a :class:`LayerMeta` in ``node.meta["bitlab"]``. Parameters keep their names.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layer_forms import float_reason
from ._common import (CONV_DIMS, CONV_FUNCTIONALS, FUNCTIONALS, META, MODULES, RECORD_KEY, LayerMeta, Record,
                      is_hf_conv1d, ntuple)

_CONV_DEFAULTS = (None, 1, 0, 1, 1)  # bias, stride, padding, dilation, groups


def explicit_padding(conv: nn.Module) -> Optional[Tuple[int, ...]]:
    """A conv module's ``padding`` as one int per spatial dim; None when it cannot be (even kernel spans with
    padding='same')."""
    return resolve_padding(conv.padding, conv.kernel_size, conv.dilation)


def resolve_padding(padding, kernel_size, dilation) -> Optional[Tuple[int, ...]]:
    """``padding`` ("valid", "same", an int or a sequence) as one int per spatial dim; None for "same" with an
    even kernel span (it pads one side more, which the explicit form cannot say)."""
    n = len(kernel_size)
    if padding == "valid":
        return (0,) * n
    if padding == "same":
        spans = [d * (k - 1) for d, k in zip(ntuple(dilation, n), kernel_size)]
        return None if any(s % 2 for s in spans) else tuple(s // 2 for s in spans)
    return ntuple(padding, n)


def conv_call_args(conv: nn.Module, padding: Tuple[int, ...]) -> tuple:
    """``(stride, padding, dilation, groups)`` of a conv module, explicit, as its functional call takes them."""
    n = len(conv.kernel_size)
    return ntuple(conv.stride, n), padding, ntuple(conv.dilation, n), conv.groups


def _module_call_to_functional(gm: fx.GraphModule, node: fx.Node, module: nn.Module, kind: str) -> Optional[str]:
    """Rewrite one call_module node; return a reason when the module is left as it is."""
    if len(node.args) != 1 or node.kwargs:
        return "called with more than one input"
    if kind in CONV_DIMS:
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        padding = explicit_padding(module)
        if padding is None:
            return "padding='same' with an even kernel span is not supported"
    graph = gm.graph
    with graph.inserting_before(node):
        w = graph.get_attr(f"{node.target}.weight")
        b = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        if kind == "conv1d_hf":  # weight stored [in, out]: read it transposed, the parameter is unchanged
            new = graph.call_function(F.linear, (node.args[0], graph.call_function(torch.t, (w,)), b))
        elif kind == "linear":
            new = graph.call_function(F.linear, (node.args[0], w, b))
        else:
            new = graph.call_function(CONV_FUNCTIONALS[kind], (node.args[0], w, b) + conv_call_args(module, padding))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    new.meta[META] = LayerMeta(fqn=node.target, object_type=type(module), op=kind if kind in CONV_DIMS else "linear",
                               weight=w.target, bias=None if b is None else b.target, transposed=kind == "conv1d_hf")
    return None


def _functional_meta(node: fx.Node, kind: str) -> Optional[LayerMeta]:
    """LayerMeta for ``F.linear(x, w, b)``/``F.conv1d(...)``/``F.conv2d(...)`` when ``w`` (and ``b``) are module
    parameters."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    w, b = bound.get("weight"), bound.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    if kind != "linear" and isinstance(bound.get("padding"), str):
        return None  # string padding on a functional call: left float
    # positional form with every argument explicit, as the module rewrite produces
    if kind == "linear":
        node.args, node.kwargs = (bound["input"], w, b), {}
    else:
        n = CONV_DIMS[kind]
        rest = [bound.get(name, d) for name, d in zip(names[3:], _CONV_DEFAULTS[1:])]
        node.args, node.kwargs = (bound["input"], w, b, ntuple(rest[0], n), ntuple(rest[1], n), ntuple(rest[2], n),
                                  rest[3]), {}
    fqn = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
    return LayerMeta(fqn=fqn, object_type=node.target, op=kind, weight=w.target, bias=None if b is None else b.target)


def module_kind(module: nn.Module) -> Optional[str]:
    """"linear"/"conv1d"/"conv2d" for nn.Linear/nn.Conv1d/nn.Conv2d and subclasses that compute the same
    (``layer_forms``: not parametrized, forward kept or a verified plain linear map); "conv1d_hf" for HF Conv1D."""
    if is_hf_conv1d(module):
        return "conv1d_hf"
    for cls, kind in MODULES.items():
        if isinstance(module, cls):
            return kind if float_reason(module) is None else None
    return None


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite supported layers to functional form; record unsupported ones in ``gm.meta``."""
    skipped = gm.meta.setdefault(RECORD_KEY, Record(stage="capturing")).skipped
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind = module_kind(module)
            if kind is not None:
                reason = _module_call_to_functional(gm, node, module, kind)
                if reason:
                    skipped[node.target] = reason
            elif float_reason(module) is not None:  # parametrized weight, a subclass that is not the plain layer
                skipped[node.target] = float_reason(module)
            elif isinstance(module, nn.modules.conv._ConvNd):  # Conv3d, ConvTranspose*: listed, left float
                skipped[node.target] = (f"{type(module).__name__} is not supported (nn.Linear, nn.Conv1d and nn.Conv2d "
                                        "are)")
        elif node.op == "call_function" and node.target in FUNCTIONALS:
            meta = _functional_meta(node, FUNCTIONALS[node.target])
            if meta is not None:
                node.meta[META] = meta
    gm.graph.lint()
    gm.recompile()
    return gm
