"""Pass 2: resolve each layer's config from the mapping and insert fake-quant ``call_module`` nodes.

For a quantized linear the graph reads::

    fc1_input_fq  = call_module[fc1_input_fq](x)
    fc1_weight_fq = call_module[fc1_weight_fq](get_attr[fc1.weight])
    fc1           = call_function[exact_layers.linear](fc1_input_fq, fc1_weight_fq, get_attr[fc1.bias],
                                                       codes_from=x, weight=..., input_quantizer=..., ...)

The layer call is ``F.linear``/``F.conv2d`` of the fake-quantized values, or, when its input codes are int8
codes its converted op computes too (``layer_input``), the same call in ``quant.exact_layers`` whose forward
value is the converted op's (the gradients are the float call's).

A weight used by several calls gets one weight fake-quant, shared. With ``bias=IntBias(...)`` the bias is
read through ``call_module[fc1_bias_fq](get_attr[fc1.bias], get_attr[fc1.weight])``. A layer input that
already comes from an output quantizer through scale-preserving ops (``input_scale``) is not quantized again, and
an IntBias without ``input=`` takes its step from that quantizer. On the layer's own dynamic (per-token) signed
input quantizer the bias step is one per token, ``input_step[t] * weight_step[n]``: the layer call quantizes the
bias per token with the multipliers of its input codes (``BiasFakeQuant.per_token``).
Output quantizers of non-layer nodes (ReLUs, identities, any function) are inserted first (``output_quant``).
"""
from __future__ import annotations

from typing import Dict, Optional, Set

from torch import fx, nn

from ..config import PerGroup, QuantConfig
from ..errors import ConfigError
from ..mapping import QConfigMapping, Rule
from ..layer_kinds import LAYER_KINDS
from ..quant.fake_quant import ActivationFakeQuant, BiasFakeQuant, WeightFakeQuant
from ._common import LayerMeta, layer_nodes, layer_weight, unique_name
from .layer_input import layer_input_codes
from .input_scale import ScaleSource, trace_scale
from .output_quant import reroute_through, insert_output_quant


def check_config_fits(meta: LayerMeta, weight_shape, config: QuantConfig) -> None:
    """Raise a ConfigError naming the layer and rule when ``config`` cannot apply to this layer."""
    where = f"layer {meta.fqn!r} ({getattr(meta.object_type, '__name__', meta.object_type)}, matched by rule {meta.rule})"
    if config.bias is not None and isinstance(config.weight.granularity, PerGroup):
        raise ConfigError(f"{where}: IntBias needs one weight scale per output channel; use weight granularity "
                          "'per_channel' or 'per_tensor', or drop bias= from the config")
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


def _input_quantizer(gm: fx.GraphModule, node: fx.Node, meta: LayerMeta, new_args: list):
    """Insert the layer's input fake quant, unless its input already comes quantized (at most as many bits)
    from an output quantizer through scale-preserving ops; return ``(the quantizer that feeds the layer or None,
    where the input scale comes from)``."""
    spec = meta.config.input
    source = trace_scale(gm, node.args[0])
    upstream = None if source.node is None else gm.get_submodule(source.node.target)
    if upstream is not None and (spec is None or upstream.spec.bits <= spec.bits):
        if spec is not None:
            meta.notes.append(f"input already quantized by {upstream.layer!r} ({upstream.spec.format}): not re-quantized")
        meta.input_from = f"{upstream.spec.format} from {upstream.layer!r}"
        meta.input_scale = source.describe() + (" (dynamic: re-quantized per layer token)" if upstream.spec.dynamic
                                                else "")
        return upstream, source
    if spec is None:
        meta.input_scale = "float"
        return None, source
    fq = ActivationFakeQuant(spec, token_dims=meta.token_dims, layer=meta.fqn, rule=str(meta.rule))
    with gm.graph.inserting_before(node):
        name = unique_name(gm, f"{meta.fqn}_input_fq")
        gm.add_submodule(name, fq)
        new_args[0] = gm.graph.call_module(name, (node.args[0],))
    meta.input_scale = "own input=" + ("static" if not spec.dynamic else f"dynamic {spec.granularity}")
    return fq, source


_STATIC = "IntActivation(bits, dynamic=False, granularity='per_tensor')"


def _bias_scale_error(meta: LayerMeta, in_fq: Optional[ActivationFakeQuant], source: ScaleSource) -> ConfigError:
    """Why an IntBias has no input step it can use, and what to do."""
    where = (f"layer {meta.fqn!r} ({getattr(meta.object_type, '__name__', meta.object_type)}, matched by rule "
             f"{meta.rule}): IntBias(bits={meta.config.bias.bits})")
    if in_fq is None:
        return ConfigError(f"{where} needs the step of a quantized input (bias step = input_step * weight_step), but "
                           f"no activation quantizer reaches the layer's input: the chain breaks at {source.broken_by}. "
                           f"Give the layer its own input={_STATIC} (or a signed dynamic input=IntActivation(bits): "
                           f"one bias step per token), or quantize the output of the op that breaks the chain (a rule "
                           f"with output={_STATIC}), or drop bias= from its config")
    owner = "its own input quantizer" if in_fq.layer == meta.fqn else f"the quantizer of {in_fq.layer!r}"
    return ConfigError(f"{where}: {owner} ({in_fq.spec.format}) is dynamic {in_fq.spec.granularity} (a new scale for "
                       f"every input; dynamic=True is IntActivation's default), so the bias step is one per token, "
                       f"and the layer's op must compute those tokens' codes itself, as int8 codes: "
                       f"{in_fq.spec.format} codes do not fit int8. Use at most 7 unsigned or 8 signed bits there, or "
                       f"{_STATIC} as Brevitas' activation quantizers are, or drop bias=")


def _bias_quantizer(gm: fx.GraphModule, node: fx.Node, meta: LayerMeta, in_fq: Optional[ActivationFakeQuant],
                    weight_fq: Optional[WeightFakeQuant], source: ScaleSource, layer_in) -> fx.Node:
    """``call_module[<fqn>_bias_fq](bias, weight)``: an IntBias on the step input_step * weight_step (per token on a
    dynamic input quantizer fused into the layer's op, ``layer_in``: the layer's input argument)."""
    if in_fq is None:
        raise _bias_scale_error(meta, in_fq, source)
    if in_fq.spec.dynamic:
        codes = layer_input_codes(gm, layer_in, meta.token_dims)
        if codes is None or codes.quantizer is not in_fq or codes.on_grid:
            raise _bias_scale_error(meta, in_fq, source)
        meta.input_scale += ", bias step per token"
    fq = BiasFakeQuant(meta.config.bias, meta.config.weight, in_fq, layer=meta.fqn, rule=str(meta.rule),
                       weight_fq=weight_fq)
    name = unique_name(gm, f"{meta.fqn}_bias_fq")
    gm.add_submodule(name, fq)
    with gm.graph.inserting_before(node):
        return gm.graph.call_module(name, (node.args[2], node.args[1]))


def _quantize_layer(gm: fx.GraphModule, node: fx.Node, meta: LayerMeta, weight_fq: Dict[str, fx.Node]) -> None:
    config = meta.config
    w_node = node.args[1]
    weight = layer_weight(gm, meta)
    check_config_fits(meta, weight.shape, config)
    new_args = list(node.args)
    if config.weight is not None:
        if meta.weight not in weight_fq:
            fq = WeightFakeQuant(config.weight, layer=meta.fqn, rule=str(meta.rule), weight=weight)
            weight_fq[meta.weight] = _call_on(gm, w_node, fq, f"{meta.fqn}_weight_fq")
        new_args[1] = weight_fq[meta.weight]
    in_fq, source = _input_quantizer(gm, node, meta, new_args)
    if config.bias is not None and node.args[2] is not None:
        wfq = gm.get_submodule(new_args[1].target) if config.weight is not None else None
        new_args[2] = _bias_quantizer(gm, node, meta, in_fq, wfq, source, new_args[0])
    node.args = tuple(new_args)
    if config.weight is not None:
        _compute_from_codes(gm, node, meta)
    if not w_node.users:  # a second get_attr of a shared weight, now read through the shared fake quant
        gm.graph.erase_node(w_node)
    if config.output is not None:
        out_fq = ActivationFakeQuant(config.output, token_dims=meta.token_dims, layer=meta.fqn, rule=str(meta.rule))
        reroute_through(gm, node, out_fq, f"{meta.fqn}_output_fq")


def _compute_from_codes(gm: fx.GraphModule, node: fx.Node, meta: LayerMeta) -> None:
    """Make the layer call compute its value from the integer codes, as its converted op will
    (``quant.exact_layers``), when its input codes are int8 codes the op can compute (``layer_input``)."""
    codes = layer_input_codes(gm, node.args[0], meta.token_dims)
    if codes is None:
        return
    w_fq = node.args[1]
    gm.get_submodule(w_fq.target).hand_over = True  # the layer reuses the codes its quantizers just computed
    codes.quantizer.hand_over = codes.quantizer.hand_over or not (codes.on_grid or codes.requantized)
    base = meta.fqn.replace(".", "_") or "layer"
    with gm.graph.inserting_before(node):  # the quantizer modules themselves, read by the layer call
        input_quantizer = gm.graph.create_node("get_attr", codes.quantizer_node.target, name=f"{base}_input_quantizer")
        weight_quantizer = gm.graph.create_node("get_attr", w_fq.target, name=f"{base}_weight_quantizer")
        bias_kwargs = _int_bias_kwargs(gm, node.args[2], base)
    node.target = LAYER_KINDS[meta.op].exact
    integer = {"train_kernel": meta.config.train_kernel} if meta.config.train_kernel != "fake_quant" else {}
    node.kwargs = {**node.kwargs, "codes_from": codes.source, "weight": w_fq.args[0],
                   "input_quantizer": input_quantizer, "weight_quantizer": weight_quantizer, "on_grid": codes.on_grid,
                   **bias_kwargs, **integer}


def _code_reader(node: fx.Node, quantizer_node: fx.Node) -> bool:
    """Whether ``node`` is a layer call computed from the codes (``exact_layers``, either train kernel) that reads
    ``quantizer_node`` only as its fake-quant input (computed from the quantizer's own input, not on-grid values) or
    weight: its forward needs the codes, not the float values (its backward makes them from the codes)."""
    if "codes_from" not in node.kwargs or node.kwargs.get("on_grid", True):
        return False
    slots = [i for i, a in enumerate(node.args) if a is quantizer_node]
    return bool(slots) and all(i in (0, 1) for i in slots) and quantizer_node not in node.kwargs.values() and \
        (0 not in slots or node.kwargs.get("codes_from") is quantizer_node.args[0])


def _mark_stand_ins(gm: fx.GraphModule) -> None:
    """Input and weight quantizers read by layer calls computed from the codes only return their input
    (``_FakeQuant.stand_in``)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (ActivationFakeQuant, WeightFakeQuant)):
            users = list(node.users)
            gm.get_submodule(node.target).stand_in = bool(users) and all(_code_reader(u, node) for u in users)


def _int_bias_kwargs(gm: fx.GraphModule, bias, base: str) -> dict:
    """An IntBias ``fq(bias, weight)``: the exact call reads its quantizer and the float bias, and adds the integer
    codes to its integer sums (as the converted op's ``bias_codes``)."""
    if not (isinstance(bias, fx.Node) and bias.op == "call_module"
            and isinstance(gm.get_submodule(bias.target), BiasFakeQuant)):
        return {}
    quantizer = gm.graph.create_node("get_attr", bias.target, name=f"{base}_bias_quantizer")
    return {"bias_quantizer": quantizer, "bias_from": bias.args[0]}


def _call_on(gm: fx.GraphModule, node: fx.Node, module: nn.Module, base: str) -> fx.Node:
    """A new ``call_module[name](node)`` right after ``node``; the uses of ``node`` stay as they are (the caller
    points the layer at it)."""
    name = unique_name(gm, base)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        return gm.graph.call_module(name, (node,))


def insert_fake_quant(gm: fx.GraphModule, mapping: QConfigMapping) -> fx.GraphModule:
    """Insert output quantizers of non-layer nodes (see ``output_quant``), then the weight, input, bias and
    output fake quant of every layer the mapping quantizes."""
    used: Set[Rule] = set()
    weight_fq: Dict[str, fx.Node] = {}
    insert_output_quant(gm, mapping, used)
    for node in list(layer_nodes(gm)):
        meta: LayerMeta = node.meta["bitlab"]
        meta.config, meta.rule = mapping.resolve(meta.fqn, meta.object_type)
        if meta.rule is not None:
            used.add(meta.rule)
        if meta.config is not None:
            _quantize_layer(gm, node, meta, weight_fq)
    _mark_stand_ins(gm)
    mapping.warn_unused(used)
    gm.graph.lint()
    gm.recompile()
    return gm
