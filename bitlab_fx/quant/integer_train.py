"""The integer training forward of a prepared layer (``QuantConfig(train_kernel="int8")``).

A quantized layer with int8 input codes has one value, in training as at inference (``arithmetic``)::

    acc = xq @ wq.T   (exact integers),   y = fp32(acc) * w_step / x_mult  (+ bias)

``exact_layers`` computes it from the codes (torch's int8 GEMM on CPU, ``arithmetic.int_matmul``) and saves the
fake-quantized float input and weight for the backward. With ``train_kernel="int8"`` a linear layer computes the
same ``y`` (:func:`_product`: the int8 GEMM, or the CPU kernel on the weight codes packed each step), and every
such layer (linear or conv) saves integers for the backward: the int8
input codes with their multipliers (one per token) and the int8 weight codes with their steps, about a
quarter of the float tensors' bytes. The backward rebuilds ``x_fq = xq / x_mult`` and ``w_fq = wq * w_step``,
exactly the fake-quant values, and computes the fake-quant layer's gradients from them (``exact_layers``'
``layer_grads``); they flow to the quantizers' outputs and on through their straight-through (or LSQ)
estimators as before.

The quantizers of such a layer need not compute the float fake-quant values at all: ``prepare_qat`` marks
those whose every reader is an integer layer (``stand_in``), and they return their input instead, whose
gradient path is the identity their straight-through estimator gives (see ``fake_quant``).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from . import arithmetic as A
from . import primitives as P
from .formats import format_of

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the bitlab ops take (ops/_schema.py)


def _kernel_fits(source: Tensor, weight_format: str, w_step: Tensor, bias_codes: Optional[Tensor]) -> bool:
    """Whether the bitlab op of this weight format computes this layer (ternary scale groups must cover whole
    32-code runs of the packed layout; integer bias codes one per channel)."""
    k = source.shape[-1]
    return (source.device.type == "cpu" and source.dtype in _KERNEL_DTYPES and k > 0 and source.numel() > 0
            and not (weight_format == "ternary" and w_step.dim() == 2 and (k // w_step.shape[1]) % 32)
            and (bias_codes is None or bias_codes.dim() == 1))


def _product(source: Tensor, act_spec, mult: Tensor, xq: Tensor, wq: Tensor, w_step: Tensor, weight_spec,
             bias: Optional[Tensor], bias_codes: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """``y`` (``source``'s leading dims, ``dtype``) of the layer, bitwise the same whichever computes it:
    :func:`arithmetic.linear_from_codes` on the int8 codes (torch's int8 GEMM, :func:`arithmetic.int_matmul`), in eager
    mode and under torch.compile (the codes come from opaque ops there, ``ops/cpu/train_quant.py``, which inductor
    keeps for the backward); for per-group steps the converted layer's op (``torch.ops.bitlab``) on the weight codes
    stored in its format this step, which quantizes ``source`` to the codes ``xq`` itself (the one arithmetic); where
    neither takes the layer, ``linear_from_codes`` (same value)."""
    fmt = format_of(weight_spec)
    int8_gemm = w_step.dim() < 2 and A.int8_gemm_fits(xq, wq, P.weight_qrange(weight_spec))
    if int8_gemm or not _kernel_fits(source, fmt.name, w_step, bias_codes):
        y = A.linear_from_codes(xq, mult, wq, w_step, bias, dtype, P.weight_qrange(weight_spec), bias_codes)
        return y.reshape(*source.shape[:-1], wq.shape[0])
    act, multiplier = (act_spec.granularity, None) if act_spec.dynamic else ("per_tensor", mult.float().reshape(1))
    kwargs = {"in_features": source.shape[-1]} if fmt.packed else {}
    if multiplier is not None:
        kwargs["act_multiplier"] = multiplier
    if bias_codes is not None:
        kwargs["bias_codes"] = bias_codes.to(torch.int32)
    y = fmt.op("linear")(source.detach(), fmt.store(wq), w_step.float(), bias, act, None, **kwargs)
    return y.to(dtype)


class _IntegerForward(torch.autograd.Function):
    """Returns ``y``; saves the int8 codes and their scales; the gradients are the float layer call's
    ``op(x_fq, w_fq, bias)`` with ``x_fq``/``w_fq`` rebuilt from the codes (``geometry``: None for linear)."""

    @staticmethod
    def forward(ctx, x_fq, w_fq, bias, y, xq, x_mult, wq, w_step, granularity, geometry):
        ctx.save_for_backward(xq, x_mult, wq, w_step)
        ctx.granularity, ctx.geometry = granularity, geometry
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x_fq.shape, x_fq.dtype, w_fq.dtype
        ctx.bias_shape = None if bias is None else bias.shape
        return y.detach()

    @staticmethod
    def backward(ctx, grad):
        from .exact_layers import layer_grads
        xq, x_mult, wq, w_step = ctx.saved_tensors
        x_fq = P.dequantize_activation(xq, x_mult, ctx.x_dtype).reshape(ctx.x_shape)
        w_fq = P.dequantize_weight(wq, w_step, ctx.granularity).to(ctx.w_dtype)
        gx, gw, gb = layer_grads(grad, x_fq, w_fq, ctx.bias_shape, ctx.geometry, ctx.needs_input_grad[:3])
        return gx, gw, gb, None, None, None, None, None, None, None


_last_saved: list = []  # [(weakref to the input, its version, spec, int8 codes, multipliers)] of the last layer call


def _shared_codes(source: Tensor, act_spec, xq: Tensor, rows: Tensor):
    """``(xq, rows)``, or the very tensors the previous layer call saved when it read the same input (same object, same
    version) with the same dynamic spec, i.e. the same codes: sibling layers (q/k/v, gate/up) then keep one copy for
    their backward, not one each. Eager mode only."""
    if torch.compiler.is_compiling() or not act_spec.dynamic:
        return xq, rows
    if _last_saved:
        ref, version, spec, saved_xq, saved_rows = _last_saved[0]
        if ref() is source and version == source._version and spec == act_spec and saved_xq.shape == xq.shape:
            return saved_xq, saved_rows
    _last_saved[:] = [(weakref.ref(source), source._version, act_spec, xq, rows)]
    return xq, rows


def linear(x_fq: Tensor, w_fq: Tensor, bias: Optional[Tensor], source: Tensor, act_spec, xq: Tensor, mult: Tensor,
           wq: Tensor, w_step: Tensor, weight_spec, float_bias: Optional[Tensor], bias_codes: Optional[Tensor]) -> Tensor:
    """The layer ``F.linear(x_fq, w_fq, bias)`` of input codes ``xq`` (multiplier ``mult``, computed from ``source``
    with ``act_spec``) and weight codes ``wq`` (step ``w_step``; fp32 whole numbers or int8): its value on the
    integer kernel, the int8 codes saved for the backward."""
    k = x_fq.shape[-1]
    xq2, wq2 = A.as_int8(xq.reshape(-1, k)), A.as_int8(wq.reshape(wq.shape[0], -1))
    rows = mult.float().reshape(-1, 1)
    float_bias = None if float_bias is None else float_bias.float()
    y = _product(source, act_spec, rows, xq2, wq2, w_step, weight_spec, float_bias, bias_codes, x_fq.dtype)
    xq2, rows = _shared_codes(source, act_spec, xq2, rows)
    return _IntegerForward.apply(x_fq, w_fq, bias, y, xq2, rows, wq2, w_step, weight_spec.granularity, None)


def conv(x_fq: Tensor, w_fq: Tensor, bias: Optional[Tensor], y: Tensor, xq: Tensor, mult: Tensor, wq: Tensor,
         w_step: Tensor, weight_spec, geometry) -> Tensor:
    """A conv layer whose value ``y`` the caller computed from the codes: saves the int8 codes for the backward."""
    return _IntegerForward.apply(x_fq, w_fq, bias, y, A.as_int8(xq), mult.float(), A.as_int8(wq), w_step,
                                 weight_spec.granularity, geometry)
