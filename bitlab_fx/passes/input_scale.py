"""Where a layer's input scale comes from: the activation quantizer whose grid values reach the layer through
scale-preserving ops, or the op that breaks that chain.

A quantized ReLU's output, max-pooled and flattened, still holds values ``q * step`` of that ReLU's quantizer
(Brevitas' ``return_quant_tensor=True``). The layer after it needs no input quantizer of its own: its op reads
the codes back exactly (``round(v * multiplier)``, ``layer_input``), and an ``IntBias`` on it uses that step
(``input_step * weight_step``, ``insert_fake_quant``). :func:`trace_scale` walks a layer's input back to that
quantizer, through the ops of one table, :data:`SCALE_PRESERVING` (functions, methods and ``torch.ops.aten``
overloads by name) and :data:`SCALE_PRESERVING_MODULES` (module types). Each entry is a rule that returns the
inputs to follow on, or why this call leaves the grid:

- max-pool (any size, padding included: it pads with -inf) and average pooling over one element;
- flatten / reshape / view / permute / transpose / squeeze / unsqueeze / contiguous / indexing (moves values);
- dropout (the identity in eval mode; in training it rescales, and the layer then runs its float call);
- ReLU (``max(0, q * step) = max(0, q) * step``);
- padding with zeros (``F.pad`` constant 0, ``nn.ZeroPad2d``, ``nn.ConstantPad2d(.., 0)``);
- concatenation of tensors that all come from one quantizer (one step).

Anything else (an add, a BatchNorm, average pooling over several values, a padding with another value, the
model input) breaks the chain; :class:`ScaleSource` names that op, for error messages and ``bfx.summary``.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import fx, nn

from ..quant.fake_quant import ActivationFakeQuant


@dataclass(frozen=True)
class ScaleSource:
    """The quantizer a layer's input scale comes from (``node``: its ``call_module`` node), the scale-preserving
    ops between them (``via``, in graph order), or, when ``node`` is None, the op that breaks the chain."""

    node: Optional[fx.Node]
    via: Tuple[str, ...] = ()
    broken_by: str = ""
    layer: str = ""  # what the quantizer belongs to: its layer, or the op whose output it quantizes

    def describe(self) -> str:
        """``"'relu1' via max_pool2d, flatten"``: the quantizer's layer and the ops the scale passes through."""
        if self.node is None:
            return f"none (chain broken at {self.broken_by})"
        return repr(self.layer) + (f" via {', '.join(self.via)}" if self.via else "")


# A rule: (graph, node) -> the nodes to follow on (same step), or a string saying why the values leave the grid.
Rule = Callable[[fx.GraphModule, fx.Node], Union[List[fx.Node], str]]


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _first(gm, node):
    return [node.args[0]]


def _max_pool(gm, node):
    return "it also returns indices" if _arg(node, 6, "return_indices", False) else [node.args[0]]


def _window_size(kernel_size) -> int:
    return math.prod(kernel_size) if isinstance(kernel_size, (tuple, list)) else int(kernel_size)


def _avg_pool(gm, node):
    k = _arg(node, 1, "kernel_size")
    if isinstance(k, (int, tuple, list)) and _window_size(k) == 1:
        return [node.args[0]]
    return f"it averages a window of {k} values (averages of codes are off the grid)"


def _pad(gm, node):
    mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
    if mode == "constant" and value in (None, 0, 0.0):
        return [node.args[0]]
    return f"it pads with mode={mode!r}, value={value!r} (only zero padding keeps the grid)"


def _getitem(gm, node):
    return [node.args[0]] if isinstance(node.args[0], fx.Node) else "it indexes a non-tensor"


def _cat(gm, node):
    tensors = _arg(node, 0, "tensors", ())
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return "it concatenates values that are not graph nodes"
    return list(tensors)


SCALE_PRESERVING: Dict[str, Rule] = {
    **dict.fromkeys(("max_pool1d", "max_pool2d", "max_pool3d"), _max_pool),
    **dict.fromkeys(("adaptive_max_pool1d", "adaptive_max_pool2d"),  # (input, output_size, return_indices)
                    lambda gm, n: "it also returns indices" if _arg(n, 2, "return_indices", False) else [n.args[0]]),
    **dict.fromkeys(("avg_pool1d", "avg_pool2d", "avg_pool3d"), _avg_pool),
    **dict.fromkeys(("flatten", "reshape", "view", "contiguous", "squeeze", "unsqueeze", "permute", "transpose",
                     "dropout", "relu", "relu_", "clone", "_unsafe_view"), _first),
    "pad": _pad,
    "constant_pad_nd": lambda gm, n: [n.args[0]] if _arg(n, 2, "value", 0) == 0 else "it pads with a non-zero value",
    "getitem": _getitem,
    **dict.fromkeys(("cat", "concat", "concatenate"), _cat),
}


def _module_pad(gm, node):
    value = getattr(gm.get_submodule(node.target), "value", 0)
    return [node.args[0]] if value == 0 else f"it pads with value={value!r} (only zero padding keeps the grid)"


def _module_avg_pool(gm, node):
    k = gm.get_submodule(node.target).kernel_size
    return [node.args[0]] if _window_size(k) == 1 else f"it averages a window of {k} values (off the grid)"


SCALE_PRESERVING_MODULES: Dict[type, Rule] = {
    **dict.fromkeys((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d),
                    lambda gm, n: "it also returns indices" if gm.get_submodule(n.target).return_indices
                    else [n.args[0]]),
    **dict.fromkeys((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), _module_avg_pool),
    **dict.fromkeys((nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.ReLU, nn.Identity), _first),
    **dict.fromkeys((nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d),
                    _module_pad),
}


def op_name(node: fx.Node) -> str:
    """A call's name as the tables know it: ``max_pool2d`` for ``F.max_pool2d``, ``x.max_pool2d`` and
    ``aten.max_pool2d.default`` alike; a module call's type name."""
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    target = node.target
    if isinstance(target, str):
        return target
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "_opname", None) or getattr(target, "__name__", str(target))


def _describe(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"the model input {node.name!r}"
    if node.op == "get_attr":
        return f"the constant {node.target!r}"
    if node.op == "call_module":
        return f"{node.target!r} ({op_name(node)})"
    return f"{op_name(node)!r} (node {node.name!r})"


def _rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Rule]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return next((r for t, r in SCALE_PRESERVING_MODULES.items() if isinstance(module, t)), None)
    if node.op in ("call_function", "call_method"):
        return SCALE_PRESERVING.get(op_name(node))
    return None


def trace_scale(gm: fx.GraphModule, x) -> ScaleSource:
    """The activation quantizer whose grid values reach ``x`` through scale-preserving ops only (``x`` itself when
    it is one), with the ops in between; or the op that breaks the chain."""
    via: List[str] = []
    while True:
        if not isinstance(x, fx.Node):
            return ScaleSource(None, broken_by=f"the constant {x!r}")
        if x.op == "call_module" and isinstance(gm.get_submodule(x.target), ActivationFakeQuant):
            return ScaleSource(x, tuple(reversed(via)), layer=gm.get_submodule(x.target).layer)
        rule = _rule(gm, x)
        if rule is None:
            why = "" if x.op in ("placeholder", "get_attr") else ", which does not keep values on a quantizer's grid"
            return ScaleSource(None, broken_by=_describe(x) + why)
        follow = rule(gm, x)
        if isinstance(follow, str):
            return ScaleSource(None, broken_by=f"{_describe(x)}: {follow}")
        via.append(x.target if x.op == "call_module" else op_name(x))
        if len(follow) == 1:
            x = follow[0]
            continue
        return _joined(gm, x, follow, via)


def _joined(gm: fx.GraphModule, node: fx.Node, inputs: List[fx.Node], via: List[str]) -> ScaleSource:
    """A concatenation: on one grid when every input comes from the same quantizer module (one step)."""
    sources = [trace_scale(gm, t) for t in inputs]
    broken = next((s for s in sources if s.node is None), None)
    if broken is not None:
        return broken
    targets = {s.node.target for s in sources}
    if len(targets) > 1:
        return ScaleSource(None, broken_by=f"{_describe(node)}: it concatenates values of different quantizers "
                                           f"({', '.join(sorted(targets))}), so of different steps")
    return dataclasses.replace(sources[0], via=sources[0].via + tuple(reversed(via)))


def upstream_quantizer_node(gm: fx.GraphModule, x) -> Optional[fx.Node]:
    """The ``call_module`` node of the quantizer :func:`trace_scale` finds for ``x``, or None."""
    return trace_scale(gm, x).node


def upstream_quantizer(gm: fx.GraphModule, x) -> Optional[ActivationFakeQuant]:
    """The activation quantizer whose grid values reach ``x`` (see :func:`trace_scale`), or None."""
    node = upstream_quantizer_node(gm, x)
    return None if node is None else gm.get_submodule(node.target)
