"""Convert, last step: converted linear layers that read the same input become one op call (sibling fusion).

::

    q = ternary_linear(x, q.packed_weight, ...)        qkv = ternary_linear(x, qkv_fused.packed_weight, ...)
    k = ternary_linear(x, k.packed_weight, ...)   ->   q = narrow(qkv, -1, 0, 64).contiguous()
    v = ternary_linear(x, v.packed_weight, ...)        k = narrow(qkv, -1, 64, 32).contiguous() ...

Siblings: linear op nodes on the same input node with the same format, input width, activation mode and
step shape (``nn.fused.fusion_key``), each its own layer with one step per row or per group. The fused
rows live in a :class:`~bitlab_fx.nn.fused.FusedLinears` registered on the graph module; the members keep
their modules, names and ``state_dict`` keys (their buffers become views of the fused rows). Each member's
``LayerMeta`` moves to its output node, so ``bfx.summary`` still lists every layer. The outputs are the
unfused layers' outputs exactly (one quantization of the same input; rows are computed independently).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

import torch
from torch import fx

from ..nn.fused import FusedLinears, fusable, fusion_key
from ..nn.quantized import QuantizedLinear
from ..nn.sibling_calls import SiblingCalls
from ._common import META, layer_nodes, unique_name


def _sibling_groups(gm: fx.GraphModule) -> List[List[fx.Node]]:
    """Lists (graph order) of 2+ converted linear op nodes that can share one call."""
    groups: Dict[tuple, List[fx.Node]] = defaultdict(list)
    seen = set()
    for node in layer_nodes(gm):
        path = node.meta[META].container
        layer = gm.get_submodule(path) if path else None
        if not isinstance(layer, QuantizedLinear) or not fusable(layer) or path in seen or node.op != "call_function":
            continue
        if node.target is not layer.format.op("linear") or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue  # (kwargs: a static multiplier, never fused)
        seen.add(path)
        groups[(node.args[0], fusion_key(layer))].append(node)
    return [nodes for nodes in groups.values() if len(nodes) >= 2]


def _fuse(gm: fx.GraphModule, nodes: List[fx.Node]) -> None:
    paths = [n.meta[META].container for n in nodes]
    members = [gm.get_submodule(p) for p in paths]
    fused = FusedLinears(members, [p.rpartition(".")[2] for p in paths])
    owner = paths[0].rpartition(".")[0]
    name = unique_name(gm, (owner.replace(".", "_") + "_" if owner else "") + "_".join(fused.names) + "_fused")
    gm.add_submodule(name, fused)
    with gm.graph.inserting_before(nodes[0]):
        op, args, kwargs = fused.op_call(nodes[0].args[0], lambda b: gm.graph.get_attr(f"{name}.{b}"))
        out = gm.graph.call_function(op, args, kwargs)
        start = 0
        for node, n in zip(nodes, fused.out_features):
            part = gm.graph.call_function(torch.narrow, (out, -1, start, n))
            # contiguous like the member's own output (later code may .view() it); a no-op for one token
            part = gm.graph.call_method("contiguous", (part,))
            part.meta[META] = node.meta[META]
            start += n
            node.replace_all_uses_with(part)
    for node in nodes:
        reads = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        gm.graph.erase_node(node)
        for r in reads:
            if not r.users:
                gm.graph.erase_node(r)


def fuse_siblings(gm: fx.GraphModule) -> fx.GraphModule:
    """Fuse every group of sibling linear layers of a converted graph, in place (see the module docstring)."""
    groups = _sibling_groups(gm)
    for nodes in groups:
        _fuse(gm, nodes)
    if groups:
        gm.graph.lint()
        gm.recompile()
    return gm


SIBLING_KEY = "bitlab_fx_sibling"  # gm.meta of a lone layer part: (SiblingCalls, index of its layer)


def _lone_linear(gm: fx.GraphModule):
    """The converted linear layer of a one-layer part whose op reads the part's only input, or None."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(nodes) != 1 or len(inputs) != 1 or META not in nodes[0].meta or nodes[0].args[0] is not inputs[0]:
        return None
    layer = gm.get_submodule(nodes[0].meta[META].container or "")
    ok = isinstance(layer, QuantizedLinear) and fusable(layer) and not nodes[0].kwargs
    return layer if ok and nodes[0].target is layer.format.op("linear") else None


def fuse_lone_layers(model: torch.nn.Module, parts: Dict[str, str]) -> None:
    """Sibling layers of an eager (untraced) module, each converted as its own one-layer graph (the q/k/v
    projections of an HF attention module): one FusedLinears per group of siblings with equal keys, registered on
    their parent; each part then answers through the group's :class:`~bitlab_fx.nn.sibling_calls.SiblingCalls`
    (one call for the members that the eager code passes the same tensor)."""
    groups: Dict[tuple, List[str]] = defaultdict(list)
    for path, kind in parts.items():
        layer = _lone_linear(model.get_submodule(path)) if kind == "layer" else None
        if layer is not None:
            groups[(path.rpartition(".")[0], fusion_key(layer))].append(path)
    for (parent_path, _), paths in groups.items():
        if len(paths) < 2:
            continue
        parts_ = [model.get_submodule(p) for p in paths]
        fused = FusedLinears([_lone_linear(g) for g in parts_], [p.rpartition(".")[2] for p in paths])
        parent = model.get_submodule(parent_path)
        parent.add_module(unique_name(parent, "_".join(fused.names) + "_fused"), fused)
        calls = SiblingCalls(fused)
        for i, gm in enumerate(parts_):
            gm.meta[SIBLING_KEY] = (calls, i)
            gm.recompile()
