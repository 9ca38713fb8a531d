"""Quantizer math on tensors: scales, rounding and straight-through estimators.

Conventions (used by every kernel too, so converted models reproduce prepared ones):

- weights: ``W ≈ Wq * g``; ``g`` is the dequantization step (fp32), one per group of the granularity.
- activations: ``xq = clamp(round(x * s), qmin, qmax)``; ``s`` is the quantization *multiplier*
  (``127 / max|x|`` for int8), so ``x ≈ xq / s``.
- all scale math runs in fp32 whatever the input dtype; ``torch.round`` rounds half to even.
- the codes themselves (multiplier, rounding, clamping) are defined once, in :mod:`.arithmetic`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ..config import IntActivation, IntWeight, PerGroup, TernaryWeight
from ..ops.cpu import train_quant
from . import arithmetic as A

EPS = A.EPS


class _StraightThrough(torch.autograd.Function):
    """Returns the quantized value ``q`` exactly; the gradient flows to ``x`` unchanged (BitNet's STE)."""

    @staticmethod
    def forward(ctx, x, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass, identity gradient to ``x`` in the backward pass."""
    return _StraightThrough.apply(x, q.detach())


def weight_groups(w: torch.Tensor, granularity) -> torch.Tensor:
    """View a weight ``[N, ...]`` as ``[N, G, n]`` groups of the granularity (G=1 per channel, N=1 per tensor)."""
    flat = w.reshape(w.shape[0], -1)
    if granularity == "per_tensor":
        return flat.reshape(1, 1, -1)
    if granularity == "per_channel":
        return flat.unsqueeze(1)
    if isinstance(granularity, PerGroup):
        return flat.reshape(flat.shape[0], flat.shape[1] // granularity.size, granularity.size)
    raise ValueError(f"unknown weight granularity {granularity!r}")


def scale_shape(w_shape, granularity) -> Tuple[int, ...]:
    """Shape of the stored weight scale: ``[1]``, ``[N]`` or ``[N, K/group]``."""
    n = w_shape[0]
    k = 1
    for d in w_shape[1:]:
        k *= d
    if granularity == "per_tensor":
        return (1,)
    if granularity == "per_channel":
        return (n,)
    return (n, k // granularity.size)


def weight_scale(w: torch.Tensor, spec: Union[TernaryWeight, IntWeight]) -> torch.Tensor:
    """The dequantization step ``g`` of ``w`` (fp32, shape :func:`scale_shape`), computed without gradient.

    For ``scale="learned"`` specs this is the initial value of the learned step (absmean for ternary,
    absmax/q for int)."""
    with torch.no_grad():
        return _scale_of(weight_groups(w.detach().float(), spec.granularity).abs(), w.shape, spec)


def _scale_of(magnitudes: torch.Tensor, w_shape, spec: Union[TernaryWeight, IntWeight]) -> torch.Tensor:
    """The step of :func:`weight_scale` from the weight's magnitudes ``|weight_groups(w)|``."""
    if isinstance(spec, TernaryWeight):
        g = magnitudes.amax(-1) if spec.scale == "absmax" else magnitudes.mean(-1)
    else:
        g = magnitudes.amax(-1) / (2 ** (spec.bits - 1) - 1)
    return g.clamp(min=EPS).reshape(scale_shape(w_shape, spec.granularity))


def weight_qrange(spec: Union[TernaryWeight, IntWeight]) -> int:
    return 1 if isinstance(spec, TernaryWeight) else 2 ** (spec.bits - 1) - 1


def _expand_scale(g: torch.Tensor, granularity) -> torch.Tensor:
    """Broadcast a stored scale against ``weight_groups(w)``."""
    if granularity == "per_tensor":
        return g.reshape(1, 1, 1)
    if granularity == "per_channel":
        return g.reshape(-1, 1, 1)
    return g.unsqueeze(-1)


def weight_codes(w: torch.Tensor, spec: Union[TernaryWeight, IntWeight],
                 scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer weights (``w``'s shape: int8 from the C kernel's one pass where it applies, else fp32 whole numbers;
    the same numbers) and their fp32 step ``g`` (``scale`` if given: a learned step, see
    :func:`lsq_fake_quantize_weight`). No gradient."""
    with torch.no_grad():
        groups = weight_groups(w.detach().float(), spec.granularity)
        if scale is None:  # the codes are written over the magnitudes the step was computed from (one tensor fewer)
            magnitudes = groups.abs()
            g, out = _scale_of(magnitudes, w.shape, spec), magnitudes
            fused = train_quant.weight_codes_s8(groups, g, weight_qrange(spec))
            if fused is not None:
                return fused.reshape(w.shape), g
        else:
            g, out = learned_step(scale.detach().float()).reshape(scale_shape(w.shape, spec.granularity)), None
        wq = A.weight_codes(groups, _expand_scale(g, spec.granularity), weight_qrange(spec), out=out)
        return wq.reshape(w.shape), g


def quantize_weight(w: torch.Tensor, spec: Union[TernaryWeight, IntWeight],
                    scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer weights (int8 tensor, same shape as ``w``) and their fp32 step ``g``: :func:`weight_codes`."""
    wq, g = weight_codes(w, spec, scale)
    return wq.to(torch.int8), g


def dequantize_weight(wq: torch.Tensor, g: torch.Tensor, granularity) -> torch.Tensor:
    """``wq * g`` (fp32, ``wq``'s shape) for codes ``wq`` and steps ``g`` of ``granularity``: int8 codes in one C
    pass (``train_quant.dequantize_s8``) where it applies, else copied to fp32 (exact) and scaled in place; the
    same numbers as the mixed-dtype product, at a fraction of its time."""
    if wq.dtype != torch.float32 and not wq.requires_grad:
        groups = weight_groups(wq, granularity)
        if g.numel() == groups.numel() // groups.shape[-1]:  # one step per group row: the C kernel's one pass
            fused = train_quant.dequantize_s8(groups, g.float(), divide=False)
            if fused is not None:
                return fused.reshape(wq.shape)
        return dequantize_weight_(wq.to(torch.float32).contiguous(), g, granularity)
    return (weight_groups(wq, granularity) * _expand_scale(g.float(), granularity)).reshape(wq.shape)


def dequantize_weight_(wq: torch.Tensor, g: torch.Tensor, granularity) -> torch.Tensor:
    """:func:`dequantize_weight` in place over fp32 codes ``wq`` (contiguous): the same numbers, no new tensor."""
    weight_groups(wq, granularity).mul_(_expand_scale(g.float(), granularity))
    return wq


def fake_quantize_weight(w: torch.Tensor, wq: torch.Tensor, g: torch.Tensor, granularity) -> torch.Tensor:
    """``wq * g`` (the codes and steps :func:`weight_codes` gave for ``w``) in ``w``'s dtype, with a
    straight-through gradient to ``w``."""
    return straight_through(w, dequantize_weight(wq, g, granularity).to(w.dtype))


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g`` in the backward pass (LSQ).
    Written as ``x + 0`` (not ``x - xg + xg``) so the forward value is exactly ``x``."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity gradient (LSQ's straight-through round)."""
    return torch.round(x).detach() + (x - x.detach())


def learned_step(scale: torch.Tensor) -> torch.Tensor:
    """The step a learned scale parameter stands for: ``max(|scale|, EPS)`` (an optimizer step that crosses
    zero flips the sign, it does not kill the quantizer)."""
    return scale.abs().clamp(min=EPS)


def lsq_fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, spec: Union[TernaryWeight, IntWeight]) -> torch.Tensor:
    """``clamp(round(W/g), -q, q) * g`` with a learned step ``g`` (``scale``, shape :func:`scale_shape`).

    ``g`` gets the LSQ gradient (Esser et al. 2020) scaled by ``1/sqrt(n * q)``, ``n`` the number of
    weights per scale; ``w`` gets the identity gradient (the STE every other weight quantizer uses).
    The forward value is exactly what :func:`quantize_weight` with ``scale`` gives, so convert matches.
    """
    q = weight_qrange(spec)
    groups = weight_groups(w.detach().float(), spec.granularity)
    g = learned_step(grad_scale(scale.float(), 1.0 / math.sqrt(groups.shape[-1] * q)))
    g = _expand_scale(g, spec.granularity)
    deq = round_pass(torch.clamp(groups / g, -q, q)) * g
    return deq.reshape(w.shape).to(w.dtype) + (w - w.detach())


def lsq_fake_quantize_activation(x: torch.Tensor, step: torch.Tensor, spec: IntActivation) -> torch.Tensor:
    """Static activation fake quant with a learned step (LSQ): ``clamp(round(x*m), qmin, qmax) / m``, ``m = 1/step``.

    The step gets the LSQ gradient scaled by ``1/sqrt(numel * qmax)``; ``x`` gets the gradient inside the
    range and none where it is clipped. Written with the multiplier ``m`` like the converted op.
    """
    g = learned_step(grad_scale(step.float(), 1.0 / math.sqrt(max(x.numel(), 1) * spec.qmax)))
    m = 1.0 / g
    q = round_pass(torch.clamp(x.float() * m, spec.qmin, spec.qmax))
    return (q / m).to(x.dtype)


def activation_amax(xf: torch.Tensor, spec: IntActivation, dims=None) -> torch.Tensor:
    """The range the spec quantizes: ``max|x|`` (signed) or ``max(x, 0)`` (unsigned), over ``dims``
    (kept) or the whole tensor."""
    r = xf.abs() if spec.signed else xf.clamp(min=0)
    return r.amax() if dims is None else r.amax(dim=dims, keepdim=True)


def activation_multiplier(x: torch.Tensor, spec: IntActivation, token_dims: int) -> torch.Tensor:
    """The dynamic multiplier ``s`` (fp32), one per token (reduced over the last ``token_dims`` dims)
    or one for the whole tensor; shaped to broadcast against ``x``."""
    with torch.no_grad():
        return _ranges_and_multiplier(x.detach().float(), spec, token_dims)[1]


def _ranges_and_multiplier(xf: torch.Tensor, spec: IntActivation, token_dims: int):
    """``(|xf| or max(xf, 0), s)``: the values :func:`activation_amax` reduces (a new tensor) and the multiplier."""
    ranges = xf.abs() if spec.signed else xf.clamp(min=0)
    if spec.granularity == "per_token" and xf.dim() > token_dims:
        amax = ranges.amax(dim=tuple(range(xf.dim() - token_dims, xf.dim())), keepdim=True)
    else:
        amax = ranges.amax() if xf.numel() else xf.new_ones(())
    return ranges, A.multiplier(amax, spec.qmax)


def dynamic_activation_codes(x: torch.Tensor, spec: IntActivation, token_dims: int):
    """``(codes, s)`` of a dynamic spec: :func:`quantize_activation` on :func:`activation_multiplier`: for signed
    8-bit codes int8 from the C kernel's one pass where it applies, else fp32 whole numbers written over the
    magnitudes the multiplier was reduced from (one tensor of ``x``'s size fewer); the same numbers. No gradient."""
    with torch.no_grad():
        xf = x.detach().float()
        if spec.signed and spec.bits == 8:
            per_token = spec.granularity == "per_token" and xf.dim() > token_dims
            fused = train_quant.activation_codes_s8(xf, token_dims if per_token else None, spec.qmax)
            if fused is not None:
                return fused
        ranges, s = _ranges_and_multiplier(xf, spec, token_dims)
        return A.codes(xf, s, spec.qmin, spec.qmax, out=ranges), s


def dequantize_activation(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q / s`` in ``dtype``: the value activation codes ``q`` with multiplier ``s`` stand for (int8 codes: one C
    pass where it applies, else copied to fp32, exact, and divided in place; the same numbers)."""
    if q.dtype != torch.float32 and not q.requires_grad and s.dtype == torch.float32 and \
            torch.broadcast_shapes(q.shape, s.shape) == q.shape:
        fused = train_quant.dequantize_s8(q, s, divide=True) if _one_per_leading_row(q, s) else None
        return (fused if fused is not None else q.to(torch.float32).div_(s)).to(dtype)
    return (q / s).to(dtype)


def _one_per_leading_row(q: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether ``s`` holds one number per row of ``q`` viewed as ``[s.numel(), -1]``: one number, or ``q``'s leading
    dims followed by ones (a per-token ``[M, 1]``, a per-sample ``[B, 1, 1, 1]``)."""
    if s.numel() == 1:
        return True
    lead = s.dim()
    while lead > 0 and s.shape[lead - 1] == 1:
        lead -= 1
    return s.dim() == q.dim() and tuple(s.shape[:lead]) == tuple(q.shape[:lead])


def fake_quantize_activation(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q / s`` (the codes :func:`quantize_activation` gave for ``x``) in ``x``'s dtype, with a
    straight-through gradient to ``x``."""
    return straight_through(x, dequantize_activation(q, s, x.dtype))


def quantize_activation(x: torch.Tensor, s: torch.Tensor, spec: IntActivation) -> torch.Tensor:
    """The integer activation codes as an fp32 tensor of whole numbers (no gradient)."""
    with torch.no_grad():
        return A.codes(x.detach().float(), s, spec.qmin, spec.qmax)


def quantize_bias(b: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer bias codes (fp32 whole numbers): ``clamp(round(b / step), -2**(bits-1), 2**(bits-1)-1)``;
    ``step = input_step * weight_step`` (per output channel or one number). Defined in :mod:`.arithmetic`."""
    return A.bias_codes(b, step, bits)


def fake_quantize_bias(b: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """``quantize_bias(b) * step`` in ``b``'s dtype with a straight-through gradient to ``b``."""
    return straight_through(b, (quantize_bias(b, step, bits) * step).to(b.dtype))
