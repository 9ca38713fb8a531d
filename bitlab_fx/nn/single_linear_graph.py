"""A converted layer part that is one linear op: eager CPU inference calls the kernel without the dispatcher.

In a partially traced model (most Hugging Face models) a layer whose parent does not trace becomes its own
tiny graph (``q_proj``, ``k_proj``, … of an eager attention module). Converted, that graph is a single
``torch.ops.bitlab.<format>_linear`` call on the layer's container buffers, and running it costs a
GraphModule call, buffer reads and a dispatcher round trip: several times the kernel of a decode step.

:class:`SingleLinearGraph` is that GraphModule, unchanged for everything that reads it (graph, code,
``print_readable``, state_dict, export, ``torch.compile``), whose ``__call__`` runs the container's direct
CPU path (:mod:`bitlab_fx.ops.cpu.direct`) when the call is plain eager CPU inference and nothing hooks the
module; otherwise, and whenever the direct path declines, the graph runs as usual.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from ..ops.cpu import direct as direct_cpu
from .quantized import QuantizedLinear

_module_hooks = torch.nn.modules.module
_CACHE = "_bitlab_direct_container"  # instance __dict__ key: the container path, or "" (not a single linear call)


def single_linear_container(gm: fx.GraphModule) -> Optional[str]:
    """The path of the QuantizedLinear whose own op call on the input is this graph's whole computation, or None."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    calls = [n for n in nodes if n.op in ("call_function", "call_module", "call_method")]
    output = nodes[-1]
    if len(placeholders) != 1 or len(calls) != 1 or output.op != "output" or output.args[0] is not calls[0]:
        return None
    call, attrs = calls[0], {n.target: n for n in nodes if n.op == "get_attr"}
    path = next(iter(attrs), "").rpartition(".")[0]
    try:
        container = gm.get_submodule(path) if path else None
    except AttributeError:
        return None
    if not isinstance(container, QuantizedLinear) or call.args[:1] != (placeholders[0],):
        return None
    read = lambda name: attrs.get(f"{path}.{name}")  # noqa: E731
    op, args, kwargs = container.op_call(placeholders[0], read)
    same = call.target is op and tuple(call.args) == args and dict(call.kwargs) == dict(kwargs)
    return path if same else None


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or _module_hooks._global_forward_hooks
                or _module_hooks._global_forward_pre_hooks)


class SingleLinearGraph(fx.GraphModule):
    """A GraphModule holding one converted linear call (see the module docstring)."""

    def _call_impl(self, *args, **kwargs):
        # nn.Module.__call__ lands here (GraphModule regenerates __call__/forward on recompile, never this)
        if len(args) == 1 and not kwargs and direct_cpu.eligible(args[0]) and not _hooked(self):
            path = self.__dict__.get(_CACHE)
            if path is None:  # first call, or a copy (deepcopy keeps only what GraphModule knows)
                path = self.__dict__[_CACHE] = single_linear_container(self) or ""
            if path:
                c = self.get_submodule(path)
                y = direct_cpu.linear(c.weight_format, args[0], c.stored_weight, c.weight_scale, c.bias, c.act,
                                      c.act_multiplier, c.in_features)
                if y is not None:
                    return y
        return super()._call_impl(*args, **kwargs)

    def __deepcopy__(self, memo):
        new = super().__deepcopy__(memo)
        # GraphModule's deepcopy re-registers buffers as persistent: keep the stand-in ``weight`` out of state_dict
        new._non_persistent_buffers_set = set(self._non_persistent_buffers_set)
        return new

    def recompile(self):
        self.__dict__.pop(_CACHE, None)  # the graph may have changed
        return super().recompile()


def with_direct_call(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` as a :class:`SingleLinearGraph` (the same modules, buffers, graph and hooks) when it is one converted
    linear call, else ``gm`` itself."""
    if isinstance(gm, SingleLinearGraph) or single_linear_container(gm) is None:
        return gm
    new = SingleLinearGraph.__new__(SingleLinearGraph)  # GraphModule gives each instance its own class
    new.__dict__.update(gm.__dict__)
    new.graph = gm.graph  # owned by the new module; generates its forward
    return new
