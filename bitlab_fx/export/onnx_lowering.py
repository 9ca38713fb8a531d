"""Lower the placeholder nodes the ONNX export emits for converted layers to the nodes onnxruntime runs.

``torch.onnx.export`` translates each ``torch.ops.bitlab`` layer op to one placeholder node
(domain :data:`PLACEHOLDER_DOMAIN`) on the layer's stored buffers, which are initializers of the ONNX
graph. Here each placeholder becomes, with its initializers re-blocked from the codes and steps:

- a linear: ``com.microsoft::MatMulNBits`` (``bits`` 2 / 4 / 8, unsigned codes ``c = code + zero point``
  with zero point 1 / 8 / 128, one fp32 scale per block of ``block_size`` input columns: the row's step),
  or ``DequantizeLinear`` + ``MatMul`` where the steps' groups are not a block size MatMulNBits takes;
- a conv: ``DequantizeLinear`` (int8 codes, one scale per output channel) + ``Conv`` (QDQ).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import ExportError
from .weights import LayerWeight, stored_layer_weight

PLACEHOLDER_DOMAIN = "bitlab_fx.placeholder"
MS_DOMAIN = "com.microsoft"
BITS = {"ternary": 2, "int4": 4, "int8": 8}
ZERO_POINT = {"ternary": 1, "int4": 8, "int8": 128}  # unsigned code = signed code + zero point


def matmul_nbits_block(layer: LayerWeight) -> int:
    """MatMulNBits' block size for ``layer``: its step group when that is a power of two >= 16 and < K,
    else (one step per row) 128; 0 when no block size holds its groups."""
    k = layer.codes.shape[1]
    if layer.group >= k:
        return 128
    g = layer.group
    return g if g >= 16 and g & (g - 1) == 0 else 0


def pack_matmul_nbits(layer: LayerWeight, block: int) -> tuple:
    """(B uint8 [N, blocks, block * bits / 8], scales fp32 [N * blocks], zero points uint8) of MatMulNBits:
    within a block, code j sits in byte j * bits // 8 from the low bits up; K is padded with zero-point codes."""
    bits, zp = BITS[layer.weight_format], ZERO_POINT[layer.weight_format]
    n, k = layer.codes.shape
    blocks = math.ceil(k / block)
    codes = np.full((n, blocks * block), zp, dtype=np.uint8)
    codes[:, :k] = (layer.codes.numpy().astype(np.int16) + zp).astype(np.uint8)
    per_byte = 8 // bits
    codes = codes.reshape(n, blocks, block // per_byte, per_byte)
    packed = np.zeros(codes.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):
        packed |= codes[..., i] << np.uint8(i * bits)
    scales = layer.steps.numpy().astype(np.float32)  # [N, blocks], or [N, 1]: one step per row
    if scales.shape[1] == 1:
        scales = np.repeat(scales, blocks, axis=1)
    zp_per_byte = 8 // bits
    zp_bytes = math.ceil(blocks / zp_per_byte)
    zp_byte = sum(zp << (i * bits) for i in range(zp_per_byte)) & 0xFF
    zero_points = np.full((n * zp_bytes,), zp_byte, dtype=np.uint8)
    return packed, scales.reshape(-1), zero_points


def lower_placeholders(model: onnx.ModelProto) -> dict:
    """Replace every placeholder node of ``model`` in place; returns {layer: the ONNX nodes it became}."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, lowered, used = [], {}, set()
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            new_nodes.append(node)
            continue
        layer = _placeholder_layer(node, inits)
        used.update(node.input[1:3])
        lower = _lower_linear if node.op_type == "Linear" else _lower_conv
        nodes, initializers, kind = lower(node, layer)
        new_nodes.extend(nodes)
        graph.initializer.extend(initializers)
        lowered[layer.name] = kind
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_read = {i for n in graph.node for i in n.input}
    keep = [i for name, i in inits.items() if name not in used or name in still_read]
    keep += [i for i in graph.initializer if i.name not in inits]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    _set_opsets(model)
    return lowered


def _placeholder_layer(node, inits: dict) -> LayerWeight:
    """The codes and steps of a placeholder's layer, read back from its stored weight and step initializers."""
    weight_name, scale_name = node.input[1], node.input[2]
    if weight_name not in inits or scale_name not in inits:
        raise ExportError(f"export_onnx: the weight {weight_name!r} of a converted layer is computed in the graph, "
                          "not stored; export a converted model whose layers read their own buffers")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    fmt = attrs["format"].decode() if isinstance(attrs["format"], bytes) else attrs["format"]
    stored = torch.from_numpy(numpy_helper.to_array(inits[weight_name]).copy())
    scale = torch.from_numpy(numpy_helper.to_array(inits[scale_name]).copy())
    name = weight_name.rsplit(".", 1)[0] if "." in weight_name else weight_name
    return stored_layer_weight(name, fmt, stored, scale, tuple(attrs["weight_shape"]))


def _set_opsets(model: onnx.ModelProto) -> None:
    domains = {o.domain for o in model.opset_import}
    kept = [o for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    if MS_DOMAIN not in domains:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    del model.functions[:]  # (the placeholders had no function bodies; nothing else emits functions here)


def _bias_input(node) -> str:
    """The placeholder's bias input (a float initializer of the layer), "" when it has none."""
    return node.input[3] if len(node.input) > 3 else ""


def _lower_linear(node, layer: LayerWeight):
    prefix = node.input[1].replace(".", "_")
    block = matmul_nbits_block(layer)
    inits = []
    bias = _bias_input(node)
    if block == 0:
        return _dequantize_matmul(node, layer, prefix, inits, bias)
    packed, scales, zero_points = pack_matmul_nbits(layer, block)
    inits += [numpy_helper.from_array(packed, prefix + "_nbits"), numpy_helper.from_array(scales, prefix + "_scales"),
              numpy_helper.from_array(zero_points, prefix + "_zero_points")]
    n, k = layer.codes.shape
    inputs = [node.input[0], prefix + "_nbits", prefix + "_scales", prefix + "_zero_points", "", bias]
    matmul = helper.make_node("MatMulNBits", inputs if bias else inputs[:4], [node.output[0]], domain=MS_DOMAIN,
                              name=node.name or prefix, K=k, N=n, bits=BITS[layer.weight_format], block_size=block)
    return [matmul], inits, f"MatMulNBits(bits={BITS[layer.weight_format]}, block_size={block})"


def _int8_codes_and_axis_scales(layer: LayerWeight, prefix: str, inits: list):
    """int8 codes and one scale per output row (DequantizeLinear axis 0), or None when the steps are per group."""
    if layer.steps.shape[1] != 1:
        return None
    codes = layer.codes.numpy().astype(np.int8).reshape(layer.weight_shape)
    inits += [numpy_helper.from_array(codes, prefix + "_int8"),
              numpy_helper.from_array(layer.steps[:, 0].numpy().astype(np.float32), prefix + "_step")]
    return prefix + "_int8", prefix + "_step"


def _dequantize_matmul(node, layer: LayerWeight, prefix: str, inits: list, bias: str):
    found = _int8_codes_and_axis_scales(layer, prefix, inits)
    if found is None:
        raise ExportError(f"export_onnx: layer {layer.name!r} has a step per {layer.group} input columns, which "
                          "neither MatMulNBits (powers of two >= 16) nor DequantizeLinear holds; quantize it "
                          "per_channel or per_group:16/32/64/128 and convert again")
    w = prefix + "_weight"
    nodes = [helper.make_node("DequantizeLinear", list(found), [w], axis=0),
             helper.make_node("Transpose", [w], [w + "_t"], perm=[1, 0])]
    out = node.output[0]
    nodes.append(helper.make_node("MatMul", [node.input[0], w + "_t"], [out + "_nobias" if bias else out]))
    if bias:
        nodes.append(helper.make_node("Add", [out + "_nobias", bias], [out]))
    return nodes, inits, "DequantizeLinear(int8) + MatMul"


def _lower_conv(node, layer: LayerWeight):
    prefix = node.input[1].replace(".", "_")
    inits = []
    found = _int8_codes_and_axis_scales(layer, prefix, inits)
    if found is None:
        raise ExportError(f"export_onnx: conv {layer.name!r} has per-group steps; ONNX DequantizeLinear holds one "
                          "step per output channel: quantize convs per_channel and convert again")
    w = prefix + "_weight"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in ("format", "weight_shape")}
    bias = _bias_input(node)
    nodes = [helper.make_node("DequantizeLinear", list(found), [w], axis=0),
             helper.make_node("Conv", [node.input[0], w] + ([bias] if bias else []), [node.output[0]], **attrs)]
    return nodes, inits, "DequantizeLinear(int8) + Conv"

