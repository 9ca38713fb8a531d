"""Prepared (QAT) layers computed exactly the way their converted op computes them.

``prepare_qat`` writes a quantized layer whose input codes the converted op can compute as::

    fc1_input_fq  = call_module[fc1_input_fq](x)
    fc1_weight_fq = call_module[fc1_weight_fq](fc1_weight)
    linear = call_function[exact_layers.linear](fc1_input_fq, fc1_weight_fq, fc1_bias,
                 codes_from=x, weight=fc1_weight, input_quantizer=<fc1_input_fq>, weight_quantizer=<fc1_weight_fq>)

The first three arguments are the ``F.linear`` call of plain fake quantization and carry the gradients
(straight-through, LSQ) exactly as before. The forward *value* is computed from the integer codes with
:mod:`~bitlab_fx.quant.arithmetic`, the arithmetic of the converted ops, so ``convert`` changes no code
and no output bit, on any CPU (a float ``F.linear`` of fake-quantized values rounds differently with
the BLAS and the ISA, and one flipped rounding tie in a hidden layer changes every layer after it).

``codes_from`` is the tensor the input codes are computed from: the layer's raw input (its own
quantizer, as the op quantizes it), or, with ``on_grid=True``, the layer input itself when it already
holds an upstream quantizer's grid values (max-pool/flatten of a quantized ReLU): ``round(v * mult)``
gives back the codes exactly. While a quantizer is disabled or blending in (``QuantWarmup``), and for
on-grid inputs in training mode (dropout rescales them), the layer is the plain float call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import arithmetic as A
from . import integer_train
from . import primitives as P


def _use_codes(input_quantizer, weight_quantizer, on_grid: bool) -> bool:
    """True when the forward value is the converted op's (every quantizer fully on); otherwise the codes the
    quantizers may have kept for this call are dropped."""
    if all(fq.enabled and fq.mix >= 1.0 for fq in (input_quantizer, weight_quantizer)) and \
            not (on_grid and input_quantizer.training):
        return True
    input_quantizer.drop_codes()
    weight_quantizer.drop_codes()
    return False


def _float_args(x_fq, w_fq, codes_from, weight, input_quantizer, weight_quantizer):
    """The fake-quant values of a float layer call: a quantizer that returned a stand-in for an integer layer
    (``stand_in``, see ``integer_train``) gives its fake-quant value now."""
    return input_quantizer.fake_value(codes_from, x_fq), weight_quantizer.fake_value(weight, w_fq)


def input_codes(x: torch.Tensor, quantizer, token_dims: int, on_grid: bool = False):
    """The codes (fp32 whole numbers) and multiplier of a layer input, exactly as its converted op computes them:
    ``clamp(round(x * mult), -128, 127)``, or on the range of a fused signed quantizer of fewer bits (the op's
    ``act_bits``; ``on_grid`` values are read back with int8 codes). The multiplier broadcasts against ``x``. (The
    quantizer's own codes of ``x``, when it just computed them: the same numbers.)"""
    kept = quantizer.take_codes(x)
    if kept is not None:
        return kept
    if not on_grid:
        return quantizer.codes(x, token_dims)
    with torch.no_grad():
        xf = x.detach().float()
        mult = quantizer.code_multiplier(xf, token_dims)
        return A.int8_codes(xf, mult), mult


def layer_grads(grad: torch.Tensor, x_fq: torch.Tensor, w_fq: torch.Tensor, bias_shape, geometry, needs):
    """``(grad_x, grad_w, grad_b)`` of the float layer call ``op(x_fq, w_fq, bias)`` (``geometry``: None for linear,
    else a conv's ``(stride, padding, dilation, groups)``); ``needs``: which of the three are wanted."""
    need_x, need_w, need_b = needs
    if geometry is None:  # linear
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = (grad.to(w_fq.dtype) @ w_fq).to(x_fq.dtype) if need_x else None
        gw = (g2.t().to(x_fq.dtype) @ x_fq.reshape(-1, x_fq.shape[-1])).to(w_fq.dtype) if need_w else None
        gb = g2.sum(0) if need_b else None
        return gx, gw, gb
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution_backward(
        grad.to(x_fq.dtype), x_fq, w_fq, list(bias_shape) if need_b else None, stride, padding, dilation,
        False, [0] * len(stride), groups, [need_x, need_w, need_b])


def backward_values(x_fq, w_fq, xq, x_mult, wq, w_step, input_quantizer, weight_quantizer, granularity):
    """The fake-quant input and weight of the layer's backward. A quantizer that returned its fake-quant value gave
    it as the call's argument; one that returned a stand-in (``_FakeQuant.stand_in``) did not compute it, and it is
    made here from the codes the forward product just used, ``xq / x_mult`` and ``wq * w_step``: the same numbers
    the quantizer would have given (same operations), written in place over the codes, which are this call's own
    fp32 temporaries and are read by nothing else (one tensor fewer of each size a step)."""
    if input_quantizer.returns_stand_in():
        x_fq = _in_place(xq, x_fq, lambda q: q.div_(x_mult), lambda q: P.dequantize_activation(q, x_mult, x_fq.dtype))
    if weight_quantizer.returns_stand_in():
        w_fq = _in_place(wq, w_fq, lambda q: P.dequantize_weight_(q, w_step, granularity),
                         lambda q: P.dequantize_weight(q, w_step, granularity).to(w_fq.dtype))
    return x_fq, w_fq


def _in_place(codes: torch.Tensor, like: torch.Tensor, in_place, out_of_place) -> torch.Tensor:
    """``in_place(codes)`` when the codes are a contiguous fp32 tensor of ``like``'s dtype, else ``out_of_place``."""
    if codes.dtype == like.dtype == torch.float32 and codes.is_contiguous() and not codes.requires_grad:
        return in_place(codes).reshape(like.shape)
    return out_of_place(codes).reshape(like.shape)


class _ExactForward(torch.autograd.Function):
    """Returns ``y`` (computed from the codes); the gradients are those of the float layer call
    ``op(x_fq, w_fq, bias)`` (``op``: "linear" or a conv with its geometry), computed from ``saved``: the
    ``(x_fq, w_fq)`` values of :func:`backward_values` (the arguments themselves may be stand-ins)."""

    @staticmethod
    def forward(ctx, x_fq, w_fq, bias, y, geometry, saved):
        ctx.save_for_backward(*saved)
        ctx.geometry = geometry
        ctx.bias_shape = None if bias is None else bias.shape
        return y.detach()  # a new tensor, not the input as-is (an output view could not be modified in place)

    @staticmethod
    def backward(ctx, grad):
        x_fq, w_fq = ctx.saved_tensors
        gx, gw, gb = layer_grads(grad, x_fq, w_fq, ctx.bias_shape, ctx.geometry, ctx.needs_input_grad[:3])
        return gx, gw, gb, None, None, None


def _bias_value(bias: Optional[torch.Tensor], bias_quantizer, bias_from: Optional[torch.Tensor], weight: torch.Tensor,
                x_mult: torch.Tensor):
    """``(float bias, integer bias codes)`` of the value: an IntBias that is fully on joins the integer sums as its
    codes (as the converted op's ``bias_codes``; per token ``[T, N]`` on a dynamic input, from the multipliers
    ``x_mult`` of this call, as the op's ``bias_bits``); otherwise the bias argument is added in float."""
    if bias is None or bias_quantizer is None or not bias_quantizer.quantizes():
        return (None if bias is None else bias.detach()), None
    return None, bias_quantizer.codes(bias_from, weight, x_mult if bias_quantizer.per_token else None)[0]


def linear(x_fq: torch.Tensor, w_fq: torch.Tensor, bias: Optional[torch.Tensor] = None, *, codes_from: torch.Tensor,
           weight: torch.Tensor, input_quantizer, weight_quantizer, on_grid: bool = False, bias_quantizer=None,
           bias_from: Optional[torch.Tensor] = None, train_kernel: str = "fake_quant") -> torch.Tensor:
    """``F.linear(x_fq, w_fq, bias)`` whose value is the converted op's (see the module docstring); with an IntBias
    (``bias_quantizer``, on the float bias ``bias_from``) its integer codes join the integer sums.
    ``train_kernel="int8"``: the integer kernel and integer saved tensors (``integer_train``)."""
    if not _use_codes(input_quantizer, weight_quantizer, on_grid):
        return F.linear(*_float_args(x_fq, w_fq, codes_from, weight, input_quantizer, weight_quantizer), bias)
    k = x_fq.shape[-1]
    xq, mult = input_codes(codes_from, input_quantizer, 1, on_grid)
    wq, w_step = weight_quantizer.codes(weight)
    float_bias, bias_codes = _bias_value(bias, bias_quantizer, bias_from, weight, mult.reshape(-1, 1))
    if train_kernel == "int8":
        return integer_train.linear(x_fq, w_fq, bias, codes_from, input_quantizer.spec, xq, mult, wq, w_step,
                                    weight_quantizer.spec, float_bias, bias_codes)
    y = A.linear_from_codes(xq.reshape(-1, k), mult.reshape(-1, 1), wq.reshape(wq.shape[0], -1), w_step,
                            float_bias, x_fq.dtype, P.weight_qrange(weight_quantizer.spec), bias_codes)
    y = y.reshape(*x_fq.shape[:-1], wq.shape[0])
    saved = backward_values(x_fq, w_fq, xq, mult, wq, w_step, input_quantizer, weight_quantizer,
                            weight_quantizer.spec.granularity)
    return _ExactForward.apply(x_fq, w_fq, bias, y, None, saved)


def _conv(x_fq, w_fq, bias, stride, padding, dilation, groups, codes_from, weight, input_quantizer, weight_quantizer,
          on_grid, bias_quantizer=None, bias_from=None, train_kernel="fake_quant"):
    conv = F.conv1d if w_fq.dim() == 3 else F.conv2d
    if isinstance(padding, str) or not _use_codes(input_quantizer, weight_quantizer, on_grid):
        x_fq, w_fq = _float_args(x_fq, w_fq, codes_from, weight, input_quantizer, weight_quantizer)
        return conv(x_fq, w_fq, bias, stride, padding, dilation, groups)
    unbatched = x_fq.dim() == w_fq.dim() - 1
    src = codes_from.unsqueeze(0) if unbatched else codes_from
    xq, mult = input_codes(src, input_quantizer, w_fq.dim() - 1, on_grid)
    wq, w_step = weight_quantizer.codes(weight)
    float_bias, bias_codes = _bias_value(bias, bias_quantizer, bias_from, weight, mult)  # per token: per sample
    y = A.conv_from_codes(xq, mult, wq.reshape(weight.shape).float(), w_step.reshape(-1), float_bias, stride, padding,
                          dilation, groups, x_fq.dtype, P.weight_qrange(weight_quantizer.spec), bias_codes)
    y = y.squeeze(0) if unbatched else y
    if unbatched:  # convolution_backward needs a batch dim: the float call's autograd, the codes' value
        x_fq, w_fq = _float_args(x_fq, w_fq, codes_from, weight, input_quantizer, weight_quantizer)
        return P.straight_through(conv(x_fq, w_fq, bias, stride, padding, dilation, groups), y)
    n = w_fq.dim() - 2
    geometry = (_ints(stride, n), _ints(padding, n), _ints(dilation, n), groups)
    if train_kernel == "int8":
        return integer_train.conv(x_fq, w_fq, bias, y, xq, mult, wq.reshape(weight.shape), w_step,
                                  weight_quantizer.spec, geometry)
    saved = backward_values(x_fq, w_fq, xq, mult, wq, w_step, input_quantizer, weight_quantizer,
                            weight_quantizer.spec.granularity)
    return _ExactForward.apply(x_fq, w_fq, bias, y, geometry, saved)


def _ints(v, n: int) -> list:
    return list(v) if isinstance(v, (tuple, list)) else [v] * n


def conv1d(x_fq, w_fq, bias=None, stride=1, padding=0, dilation=1, groups=1, *, codes_from, weight, input_quantizer,
           weight_quantizer, on_grid: bool = False, bias_quantizer=None, bias_from=None, train_kernel="fake_quant"):
    """``F.conv1d(x_fq, w_fq, bias, ...)`` whose value is the converted op's (one multiplier per sample)."""
    return _conv(x_fq, w_fq, bias, stride, padding, dilation, groups, codes_from, weight, input_quantizer,
                 weight_quantizer, on_grid, bias_quantizer, bias_from, train_kernel)


def conv2d(x_fq, w_fq, bias=None, stride=1, padding=0, dilation=1, groups=1, *, codes_from, weight, input_quantizer,
           weight_quantizer, on_grid: bool = False, bias_quantizer=None, bias_from=None, train_kernel="fake_quant"):
    """``F.conv2d(x_fq, w_fq, bias, ...)`` whose value is the converted op's (one multiplier per sample)."""
    return _conv(x_fq, w_fq, bias, stride, padding, dilation, groups, codes_from, weight, input_quantizer,
                 weight_quantizer, on_grid, bias_quantizer, bias_from, train_kernel)

