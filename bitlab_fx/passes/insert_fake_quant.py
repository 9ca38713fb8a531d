"""Pass 2: resolve each layer's config from the mapping and insert fake-quant ``call_module`` nodes.

For a quantized linear the graph reads::

    fc1_input_fq  = call_module[fc1_input_fq](x)
    fc1_weight_fq = call_module[fc1_weight_fq](get_attr[fc1.weight])
    fc1           = call_function[F.linear](fc1_input_fq, fc1_weight_fq, get_attr[fc1.bias])

A weight used by several calls gets one weight fake-quant, shared.
"""
from __future__ import annotations

from typing import Dict, Set

from torch import fx, nn

from ..config import PerGroup, QuantConfig
from ..errors import ConfigError
from ..mapping import QConfigMapping, Rule
from ..quant.fake_quant import ActivationFakeQuant, WeightFakeQuant
from ._common import LayerMeta, layer_nodes, unique_name


def check_config_fits(meta: LayerMeta, weight_shape, config: QuantConfig) -> None:
    """Raise a ConfigError naming the layer and rule when ``config`` cannot apply to this layer."""
    where = f"layer {meta.fqn!r} ({getattr(meta.object_type, '__name__', meta.object_type)}, matched by rule {meta.rule})"
    if config.bias is not None:
        raise ConfigError(f"{where}: IntBias is not supported by prepare_qat in this version; drop bias= from the config")
    if config.weight is None:
        return
    g = config.weight.granularity
    if isinstance(g, PerGroup):
        if meta.op != "linear":
            raise ConfigError(f"{where}: PerGroup weight granularity is supported for linear layers only; "
                              "use 'per_channel' for conv layers (e.g. set_object_type(nn.Conv2d, bfx.ternary()))")
        k = weight_shape[1]
        if k % g.size:
            raise ConfigError(f"{where}: group size {g.size} does not divide in_features={k}; "
                              f"choose a group size that divides {k}, or use 'per_channel'")


def _insert_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, base: str) -> fx.Node:
    """Insert ``call_module[name](node)`` right after ``node`` and route the given uses through it."""
    name = unique_name(gm, base)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        return gm.graph.call_module(name, (node,))


def insert_fake_quant(gm: fx.GraphModule, mapping: QConfigMapping) -> fx.GraphModule:
    """Insert weight and input fake-quant nodes for every layer the mapping quantizes."""
    used: Set[Rule] = set()
    weight_fq: Dict[str, fx.Node] = {}
    for node in list(layer_nodes(gm)):
        meta: LayerMeta = node.meta["bitlab"]
        meta.config, meta.rule = mapping.resolve(meta.fqn, meta.object_type)
        if meta.rule is not None:
            used.add(meta.rule)
        config = meta.config
        if config is None:
            continue
        w_node, x_node = node.args[1], node.args[0]
        check_config_fits(meta, gm.get_parameter(meta.weight).shape, config)
        new_args = list(node.args)
        if config.weight is not None:
            if meta.weight not in weight_fq:
                fq = WeightFakeQuant(config.weight, layer=meta.fqn, rule=str(meta.rule))
                weight_fq[meta.weight] = _insert_after(gm, w_node, fq, f"{meta.fqn}_weight_fq")
            new_args[1] = weight_fq[meta.weight]
        if config.input is not None:
            fq = ActivationFakeQuant(config.input, token_dims=meta.token_dims, layer=meta.fqn, rule=str(meta.rule))
            with gm.graph.inserting_before(node):
                name = unique_name(gm, f"{meta.fqn}_input_fq")
                gm.add_submodule(name, fq)
                new_args[0] = gm.graph.call_module(name, (x_node,))
        node.args = tuple(new_args)
        if not w_node.users:  # a second get_attr of a shared weight, now read through the shared fake quant
            gm.graph.erase_node(w_node)
        if config.output is not None:
            out_fq = ActivationFakeQuant(config.output, token_dims=meta.token_dims, layer=meta.fqn, rule=str(meta.rule))
            users = list(node.users)
            q = _insert_after(gm, node, out_fq, f"{meta.fqn}_output_fq")
            for user in users:
                user.replace_input_with(node, q)
    mapping.warn_unused(used)
    gm.graph.lint()
    gm.recompile()
    return gm
