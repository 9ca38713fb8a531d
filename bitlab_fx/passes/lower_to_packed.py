"""Pass 3 (convert): each fake-quantized layer becomes one ``torch.ops.bitlab`` call on packed weights.

::

    fc1 = call_function[bitlab.ternary_linear](x, get_attr[fc1.packed_weight], get_attr[fc1.weight_scale],
                                               get_attr[fc1.bias], "per_token", None)

The module at ``fc1`` becomes a :class:`~bitlab_fx.nn.QuantizedLinear` holding only packed buffers.
The op quantizes its input itself where ``layer_input`` finds int8 codes for it (the layer's int8 signed
input quantizer, fused; or a static quantizer's grid values, re-quantized exactly with its multiplier);
activation quantizers not fused (lower bits, unsigned, outputs) become ``bitlab.quantize_dequantize``
calls (``lower_activations``). Weights of
2..4 bits are packed two per byte (``bitlab.int4_linear``/``int4_conv2d``), 5..8 bits stored as int8;
an IntBias is stored as int32 codes (``bias_codes``, on the step ``weight_scale / act_multiplier``) that the op
adds to its integer sums, or, on a layer whose op takes float activations (``act="none"``), as its quantized
float value. An IntBias on a dynamic (per-token) input has no codes to store, its step changes with every token:
the layer keeps the float bias and the op quantizes it per token at run time (``bias_bits``) and adds those codes
to its integer sums, as the prepared layer does. A dynamic signed input quantizer of fewer than 8 bits is fused
into the op as ``act_bits``.

A quantized layer's weight that other nodes also read (tied weights) stays float for them: it is kept
on the container at the same path (``fc1.weight``), with a warning that its size saving is lost.
"""
from __future__ import annotations

import dataclasses
import warnings

from typing import Dict, List, Optional, Set

import torch
from torch import fx

from ..errors import ConvertError
from ..layer_kinds import LAYER_KINDS
from ..nn.quantized import _QuantizedBase
from ..quant.fake_quant import BiasFakeQuant, WeightFakeQuant
from .layer_input import layer_input_codes
from .lower_activations import _static_multiplier, lower_activation_quantizers
from ._common import META, LayerMeta, layer_nodes, layer_weight, set_submodule, unique_name


def _module_at(gm: fx.GraphModule, node) -> Optional[torch.nn.Module]:
    return gm.get_submodule(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None


def _fused_activation(gm: fx.GraphModule, x_node, meta: LayerMeta):
    """``(act mode, static multiplier, op input, act_bits)``: the op quantizes its input itself when ``layer_input``
    finds codes for it, else it takes float activations (``"none"``)."""
    codes = layer_input_codes(gm, x_node, meta.token_dims)
    if codes is None or (codes.on_grid and not codes.quantizer.enabled):
        return "none", None, x_node, 8
    if codes.quantizer.spec.dynamic:
        return codes.quantizer.spec.granularity, None, codes.source, codes.act_bits
    # an on-grid quantizer stays in the graph and is lowered (and warned about) by lower_activations
    return ("per_tensor", _static_multiplier(codes.quantizer, "convert", warn=not codes.on_grid), codes.source,
            codes.act_bits)


def _container_path(gm: fx.GraphModule, meta: LayerMeta) -> str:
    """Where the converted layer lives: the module's own path, or ``<owner>.<param>_quantized`` for functional calls."""
    if isinstance(meta.object_type, type):
        return meta.fqn
    owner, _, pname = meta.weight.rpartition(".")
    name = unique_name(gm.get_submodule(owner), f"{pname}_quantized")
    return f"{owner}.{name}" if owner else name


def _layer_bias(gm: fx.GraphModule, node: fx.Node, bias: Optional[torch.Tensor], weight: torch.Tensor, act: str):
    """``(float bias, int32 bias codes, bias_bits)`` of a call: an IntBias that is on becomes its integer codes where
    the op has integer sums (``act`` not ``"none"``: a static multiplier, the input half of the bias step), or, on
    a per-token input step, stays float with ``bias_bits`` (the op quantizes it per token); else its quantized
    float value; a plain bias stays float."""
    bfq = _module_at(gm, node.args[2])
    if bias is None or not isinstance(bfq, BiasFakeQuant):
        return bias, None, 0
    with torch.no_grad():
        if act != "none" and bfq.quantizes():
            if bfq.per_token:
                return bias.detach(), None, bfq.spec.bits
            return None, bfq.codes(bias, weight)[0].to(torch.int32), 0
        return bfq.eval()(bias, weight), None, 0


def _float_params(gm: fx.GraphModule, meta: LayerMeta, replaced: Dict[str, torch.nn.Module]):
    """The layer's float ``(weight [out, in, ...], bias)``: in the graph module, or in the float module a container
    already replaced (a second call of a shared weight)."""
    def param(target):
        path = next((p for p in replaced if target.startswith(p + ".")), None)
        return gm.get_parameter(target) if path is None else getattr(replaced[path], target[len(path) + 1:])

    w = param(meta.weight)
    return (w.t() if meta.transposed else w), (param(meta.bias) if meta.bias else None)


def _build_container(gm: fx.GraphModule, node: fx.Node, meta: LayerMeta, wfq: WeightFakeQuant, act: str,
                     act_multiplier: Optional[torch.Tensor], bias, bias_codes, act_bits: int, bias_bits: int):
    weight = layer_weight(gm, meta)
    spec = wfq.spec
    g = wfq.step(weight) if spec.learned else None  # a learned step is packed as trained
    cls = LAYER_KINDS[meta.op].container
    geometry = tuple(node.args[3:7]) if meta.op != "linear" else ()  # stride, padding, dilation, groups
    container = cls(weight, bias, spec, *geometry, act=act, act_multiplier=act_multiplier, name=meta.fqn,
                    rule=str(meta.rule), weight_scale=g, bias_codes=bias_codes)
    container.act_bits, container.bias_bits = act_bits, bias_bits
    return container


def _bias_args(gm: fx.GraphModule, node: fx.Node, meta: LayerMeta, container, stored: Optional[str], bias, codes,
               bias_bits: int, get):
    """``(bias, bias_codes, bias_bits)`` of this call: the container's own when this call uses the bias it was built
    with (a buffer of its own where this call's differ: another call of a shared weight behind another quantizer);
    a different bias parameter goes in float (e.g. ``F.linear(h, self.fc.weight, b)`` besides ``self.fc(x)``)."""
    if meta.bias is None:
        return None, None, 0
    if meta.bias != stored:
        old = node.args[2]
        return (old.args[0] if _module_at(gm, old) is not None else old), None, 0  # an IntBias fq(bias, weight): float
    if codes is not None:
        return None, _own_buffer(container, "bias_codes", codes, get), 0
    return _own_buffer(container, "bias", bias.detach(), get), None, bias_bits


def _own_buffer(container, name: str, value: torch.Tensor, get):
    """``get(name)`` when the container's buffer ``name`` holds ``value``, else a new buffer of the container
    holding it (another call of a shared weight)."""
    own = container._buffers.get(name)
    if own is not None and own.shape == value.shape and own.dtype == value.dtype and torch.equal(own, value):
        return get(name)
    new = unique_name(container, name)
    container.register_buffer(new, value)
    return get(new)


def _multiplier_arg(container, multiplier: Optional[torch.Tensor], get):
    """The static multiplier of this call: the container's own (stored when it was built), or, for another call
    of a shared weight behind another quantizer, a buffer of its own."""
    return None if multiplier is None else _own_buffer(container, "act_multiplier", multiplier, get)


def _erase_if_unused(gm: fx.GraphModule, *nodes) -> None:
    for n in nodes:
        if isinstance(n, fx.Node) and not n.users:
            gm.graph.erase_node(n)


def _readers(gm: fx.GraphModule, target: str) -> List[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]


def _describe_readers(nodes: List[fx.Node]) -> str:
    users = [u.name for n in nodes for u in n.users] or [n.name for n in nodes]
    return ", ".join(repr(u) for u in dict.fromkeys(users))


def _warn_float_kept(layer: str, what: str, kept_at: str, nodes: List[fx.Node]) -> None:
    warnings.warn(f"bitlab_fx convert: layer {layer!r} is quantized, but its float {what} is kept (at {kept_at!r}) "
                  f"because graph node(s) {_describe_readers(nodes)} also read it outside the layer; the size saving "
                  f"is lost for it. To drop it, do not read the weight elsewhere, or keep the layer float with "
                  f"set_module_name({layer!r}, None)", UserWarning, stacklevel=4)


def _drop_float_params(gm: fx.GraphModule, meta: LayerMeta) -> None:
    """Functional calls: delete the float weight/bias from their owner once nothing reads them."""
    for target in (meta.weight, meta.bias):
        if not target:
            continue
        owner, _, name = target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if isinstance(module, _QuantizedBase) or not hasattr(module, name):
            continue  # the weight of a converted module layer (also called functionally), or already dropped
        readers = _readers(gm, target)
        if not readers:
            delattr(module, name)
        elif target == meta.weight:
            _warn_float_kept(meta.fqn, "weight", target, readers)


def _keep_float_reads(gm: fx.GraphModule, replaced: Dict[str, torch.nn.Module], own: Set[fx.Node]) -> None:
    """A swapped-out module's weight/bias still read elsewhere in the graph (tied weights): keep the float tensor
    on the container, at the same path when it is free, and point those reads at it. ``own``: the container
    reads the lowered ops make."""
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node in own:
            continue
        path = next((p for p in replaced if node.target.startswith(p + ".")), None)
        if path is None:
            continue
        attr = node.target[len(path) + 1:]
        container, original = gm.get_submodule(path), replaced[path]
        value = getattr(original, attr, None) if "." not in attr else None
        if not torch.is_tensor(value):
            raise ConvertError(f"convert: graph node {node.name!r} reads {node.target!r}, but the layer {path!r} is "
                               f"replaced by a {type(container).__name__} that has no {attr!r}; keep the layer float "
                               f"with set_module_name({path!r}, None)")
        current = getattr(container, attr, None) if hasattr(container, attr) else None
        if torch.is_tensor(current) and current.shape == value.shape and current.dtype == value.dtype \
                and torch.equal(current, value.detach()):
            continue  # e.g. the float bias, stored as is
        name = attr if not hasattr(container, attr) else unique_name(container, f"{attr}_float")
        container.register_buffer(name, value.detach())
        readers = [r for r in _readers(gm, node.target) if r not in own]
        for r in readers:
            r.target = f"{path}.{name}"
        _warn_float_kept(path, attr, f"{path}.{name}", readers)


def _lint(gm: fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except RuntimeError as e:
        raise ConvertError(f"convert: the lowered graph is invalid ({e}); a quantized layer's parameter is probably "
                           "read elsewhere in the model: keep that layer float with set_module_name(name, None)") from e


def lower_to_packed(gm: fx.GraphModule) -> fx.GraphModule:
    containers: Dict[str, str] = {}
    replaced: Dict[str, torch.nn.Module] = {}  # module path -> the float module swapped out for its container
    functional: List[LayerMeta] = []
    container_bias: Dict[str, Optional[str]] = {}  # weight -> the bias stored in its container
    own: Set[fx.Node] = set()  # get_attr nodes of the containers' buffers, made below
    for node in list(layer_nodes(gm)):
        meta: LayerMeta = node.meta[META]
        wfq = _module_at(gm, node.args[1])
        if not isinstance(wfq, WeightFakeQuant):
            continue  # float layer, or weight left float
        x_node, w_node = node.args[0], node.args[1]
        act, multiplier, x_in, act_bits = _fused_activation(gm, x_node, meta)
        weight, bias = _float_params(gm, meta, replaced)
        bias, bias_codes, bias_bits = _layer_bias(gm, node, bias, weight, act)
        if meta.weight not in containers:
            container = _build_container(gm, node, meta, wfq, act, multiplier, bias, bias_codes, act_bits, bias_bits)
            containers[meta.weight] = _container_path(gm, meta)
            container_bias[meta.weight] = meta.bias
            if isinstance(meta.object_type, type):
                replaced[containers[meta.weight]] = gm.get_submodule(containers[meta.weight])
            set_submodule(gm, containers[meta.weight], container)
        path = containers[meta.weight]
        container = gm.get_submodule(path)
        with gm.graph.inserting_before(node):
            def get(name, path=path):
                n = gm.graph.get_attr(f"{path}.{name}")
                own.add(n)
                return n
            bias, bias_codes, bias_bits = _bias_args(gm, node, meta, container, container_bias[meta.weight], bias,
                                                     bias_codes, bias_bits, get)
            op, args, kwargs = container.op_call(x_in, get, bias=bias, act=act, bias_codes=bias_codes,
                                                 act_multiplier=_multiplier_arg(container, multiplier, get),
                                                 act_bits=act_bits, bias_bits=bias_bits)
            new = gm.graph.call_function(op, args, kwargs)
        new.meta.update(node.meta)
        # a fresh record: a deep-copied GraphModule shares node.meta objects with the model it was copied from
        new.meta[META] = dataclasses.replace(meta, container=path)
        node.replace_all_uses_with(new)
        old_bias, w_src = node.args[2], w_node.args[0]
        bias_fq_args = old_bias.args if _module_at(gm, old_bias) is not None else ()  # IntBias fq(bias, weight)
        quantizer_reads = [node.kwargs[k] for k in ("input_quantizer", "weight_quantizer", "bias_quantizer")
                           if k in node.kwargs]
        gm.graph.erase_node(node)
        _erase_if_unused(gm, w_node, x_node if x_in is not x_node else None, old_bias, *quantizer_reads)
        _erase_if_unused(gm, *(a for a in bias_fq_args if a is not w_src))  # w_src goes below
        w_get = w_src.args[0] if meta.transposed else None  # torch.t(get_attr[weight]): the get_attr goes too
        _erase_if_unused(gm, w_src, w_get)
        if not isinstance(meta.object_type, type):
            functional.append(meta)
    for meta in functional:  # after every layer is lowered: a weight shared by several calls is read until then
        _drop_float_params(gm, meta)
    _keep_float_reads(gm, replaced, own)
    lower_activation_quantizers(gm)
    _lint(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
