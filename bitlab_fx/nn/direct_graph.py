"""Converted graphs that, in eager CPU inference, call their linear kernels without the dispatcher.

A converted GraphModule calls ``torch.ops.bitlab.<format>_linear`` on its buffers. Through torch's
dispatcher that call costs about as much as the kernel of a decode step (M = 1) on a small layer, and a
decoder makes ~200 of them per token. :class:`DirectCallGraph` keeps the graph exactly as it is (nodes,
``code``, ``print_readable``, state_dict, export, ``torch.compile``, ``bfx.summary`` all see the ops), but
the ``forward`` it runs is generated from a copy of the graph in which each linear op node calls
:func:`bitlab_fx.ops.cpu.direct.call_linear_op` instead: the same kernel on the same arguments when the
call is plain eager CPU inference, and the op itself otherwise (autograd, modes, tracers, compilers, other
devices). ``BITLAB_FX_DIRECT_CPU=0`` makes every call go through the op.
"""
from __future__ import annotations

import copy
import operator

import torch

from torch import fx
from torch.fx.graph_module import _forward_from_src

from ..ops.cpu import direct as direct_cpu
from ..passes.fuse_siblings import SIBLING_KEY


def _direct_forward(gm: fx.GraphModule):
    """The ``forward`` of ``gm``'s graph with every bitlab linear op node routed through ``call_linear_op``,
    or None when the graph calls no linear op."""
    graph = copy.deepcopy(gm.graph)  # with its codegen (export graphs flatten/unflatten pytree inputs and outputs)
    routed = False
    for node in list(graph.nodes):
        if node.op == "get_attr":
            _read_through_dicts(gm, graph, node)
        if node.op == "call_function" and direct_cpu.linear_op_format(node.target) is not None:
            node.args = (node.target,) + tuple(node.args)
            node.target = direct_cpu.call_linear_op
            routed = True
    if not routed:
        return None
    code = graph.python_code(root_module="self")
    return _forward_from_src(code.src, code.globals)


def _read_through_dicts(gm: fx.GraphModule, graph: fx.Graph, node: fx.Node) -> None:
    """Replace ``self.a.b.weight`` (one ``nn.Module.__getattr__`` per dot, ~1 us each) by reads of the dicts that
    hold them (``self._modules['a']._modules['b']._buffers['weight']``, ~0.1 us): looked up by name on every
    call, so a buffer replaced by ``.to()`` or ``load_state_dict`` is read as it is then."""
    owner, path = gm, node.target.split(".")
    steps = []
    for name in path:
        store = next((d for d in ("_modules", "_buffers", "_parameters") if name in getattr(owner, d, {})), None)
        if store is None:
            return  # a plain attribute: keep the ordinary read
        steps.append((store, name))
        owner = getattr(owner, store)[name]
    with graph.inserting_before(node):
        value = graph.get_attr(steps[0][0])
        value = graph.call_function(operator.getitem, (value, steps[0][1]))
        for store, name in steps[1:]:
            value = graph.call_function(operator.getitem, (graph.call_function(getattr, (value, store)), name))
    node.replace_all_uses_with(value)
    graph.erase_node(node)


class DirectCallGraph(fx.GraphModule):
    """A converted GraphModule whose eager forward calls the linear kernels directly (see the module docstring)."""

    def __deepcopy__(self, memo):
        new = super().__deepcopy__(memo)
        # GraphModule's deepcopy registers every buffer as persistent again: keep the layer parts' stand-in
        # ``weight`` (partial.convert_partial) out of the copy's state_dict
        new._non_persistent_buffers_set = set(self._non_persistent_buffers_set)
        new._share_sibling_calls()  # (meta, which names the siblings' FusedLinears copy, is restored last)
        return new

    def recompile(self):
        python_code = super().recompile()  # the graph's own code: what ``code``, printing and pickling use
        forward = _direct_forward(self)
        if forward is not None:
            type(self).forward = forward  # each GraphModule instance has its own class
        self._share_sibling_calls()
        return python_code

    def _share_sibling_calls(self) -> None:
        """A lone layer with eager siblings (``passes.fuse_siblings.fuse_lone_layers``) answers through their
        shared call in eager mode; compilers and tracers see the graph's own forward."""
        sibling = getattr(self, "meta", {}).get(SIBLING_KEY)
        cls = type(self)
        own = getattr(cls.forward, "own_forward", cls.forward)  # (already wrapped: wrap the graph's forward again)
        if sibling is None:
            return
        calls, index = sibling

        def forward(self, *args, **kwargs):
            if len(args) == 1 and not kwargs and not torch.compiler.is_compiling():
                return calls(index, args[0])
            return own(self, *args, **kwargs)

        forward.own_forward = own
        cls.forward = forward


def with_direct_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn a converted GraphModule into a :class:`DirectCallGraph` in place (same object, modules and graph)."""
    if not isinstance(gm, DirectCallGraph):
        # like GraphModule.__new__: a class of its own (where recompile puts forward), named so that deepcopy,
        # which rebuilds from the first class up the MRO with another name, rebuilds a DirectCallGraph
        cls = type("GraphModuleImpl", (DirectCallGraph,), {})
        cls.__name__ = type(gm).__name__  # what repr shows ("GraphModule", or the class_name it was built with)
        gm.__class__ = cls
        gm.recompile()
    return gm

