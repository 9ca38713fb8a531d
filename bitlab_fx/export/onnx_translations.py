"""ONNX translations of the ``torch.ops.bitlab`` ops, for ``torch.onnx.export(custom_translation_table=...)``.

Each layer op becomes the activation quantization in standard ONNX ops (what the op does to its input
before the integer product) and one placeholder node on the stored weight and steps, lowered afterwards by
:mod:`bitlab_fx.export.onnx_lowering`; ``quantize_dequantize`` becomes standard ops only.
"""
from __future__ import annotations

import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from ..quant.arithmetic import EPS
from .onnx_lowering import PLACEHOLDER_DOMAIN

_PLACEHOLDERS = onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1)


def _placeholder_schema(name: str, attributes: list) -> OpSchema:
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        name, PLACEHOLDER_DOMAIN, 1,
        inputs=[param("X", "T"), param("W", "TW"), param("scale", "T"), param("bias", "T", param_option=optional)],
        outputs=[param("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("TW", ["tensor(uint8)", "tensor(int8)"], "")],
        attributes=[OpSchema.Attribute(a, kind, "") for a, kind in attributes])


_LINEAR = onnxscript.values.Op(_PLACEHOLDERS, "Linear", _placeholder_schema(
    "Linear", [("format", OpSchema.AttrType.STRING), ("weight_shape", OpSchema.AttrType.INTS)]))
_CONV = onnxscript.values.Op(_PLACEHOLDERS, "Conv", _placeholder_schema(
    "Conv", [("format", OpSchema.AttrType.STRING), ("weight_shape", OpSchema.AttrType.INTS),
             ("kernel_shape", OpSchema.AttrType.INTS),
             ("strides", OpSchema.AttrType.INTS), ("pads", OpSchema.AttrType.INTS),
             ("dilations", OpSchema.AttrType.INTS), ("group", OpSchema.AttrType.INT)]))


def _multiplier(x, act: str, multiplier, reduce_axes: list, qmax: float, signed: bool = True):
    """``s``: the static multiplier, or ``qmax / max(amax, EPS)`` per token (over ``reduce_axes``) or tensor."""
    if multiplier is not None:
        return multiplier
    magnitude = op.Abs(x) if signed else op.Relu(x)
    if act == "per_token":
        amax = op.ReduceMax(magnitude, op.Constant(value_ints=reduce_axes), keepdims=1)
    else:
        amax = op.ReduceMax(magnitude, keepdims=0)
    amax = op.Max(amax, op.Constant(value_float=EPS))
    return op.Mul(op.Reciprocal(amax), op.Constant(value_float=qmax))  # as torch evaluates qmax / amax


def _fake_quantize(x, s, qmin: float, qmax: float):
    codes = op.Clip(op.Round(op.Mul(x, s)), op.Constant(value_float=qmin), op.Constant(value_float=qmax))
    return op.Div(codes, s)


def _int8_input(x, act: str, multiplier, reduce_axes: list):
    """The layer's input as its int8 activation codes / s (``act="none"``: as it is)."""
    if act == "none":
        return x
    return _fake_quantize(x, _multiplier(x, act, multiplier, reduce_axes, 127.0), -128.0, 127.0)


def _linear(weight_format: str):
    def translate(x, weight, weight_scale, bias=None, act="per_token", act_scale=None, in_features=-1,
                  act_multiplier=None):
        multiplier = act_multiplier if act_multiplier is not None else act_scale
        xq = _int8_input(x, act, multiplier, [-1])
        k = in_features if in_features > 0 else int(weight.shape[1])  # packed formats pass the true K
        return _LINEAR(xq, weight, weight_scale, bias, format=weight_format, weight_shape=[int(weight.shape[0]), k])
    return translate


def _int8_linear(x, weight, weight_scale, bias=None, act="per_token", act_scale=None, act_multiplier=None):
    return _linear("int8")(x, weight, weight_scale, bias, act, act_scale, -1, act_multiplier)


def _conv(weight_format: str, packed: bool):
    def translate(x, weight, weight_scale, bias, *rest):
        weight_shape, rest = (list(rest[0]), rest[1:]) if packed else (None, rest)
        stride, padding, dilation, groups = rest[:4]
        act = rest[4] if len(rest) > 4 else "per_token"
        multiplier = next((m for m in rest[5:] if m is not None), None)
        xq = _int8_input(x, act, multiplier, [1, 2, 3])  # per_token of a conv: one scale per sample
        weight_shape = [int(d) for d in (weight_shape if packed else weight.shape)]
        return _CONV(xq, weight, weight_scale, bias, format=weight_format, weight_shape=weight_shape,
                     kernel_shape=weight_shape[2:],
                     strides=list(stride), pads=list(padding) * 2, dilations=list(dilation), group=int(groups))
    return translate


def _quantize_dequantize(x, multiplier, bits: int, signed: bool, granularity: str = "per_tensor", token_dims: int = 1):
    qmax = float(2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)
    qmin = float(-(2 ** (bits - 1)) if signed else 0)
    rank = len(x.shape)
    axes = list(range(rank - token_dims, rank)) if granularity == "per_token" and rank > token_dims else None
    s = _multiplier(x, "per_token" if axes else "per_tensor", multiplier, axes or [], qmax, signed)
    return _fake_quantize(x, s, qmin, qmax)


def table() -> dict:
    """{bitlab op overload: ONNX translation}."""
    bitlab = torch.ops.bitlab
    return {bitlab.ternary_linear.default: _linear("ternary"), bitlab.int4_linear.default: _linear("int4"),
            bitlab.int8_linear.default: _int8_linear,
            bitlab.ternary_conv2d.default: _conv("ternary", packed=True),
            bitlab.int4_conv2d.default: _conv("int4", packed=True),
            bitlab.int8_conv2d.default: _conv("int8", packed=False),
            bitlab.quantize_dequantize.default: _quantize_dequantize}


__all__ = ["table"]
