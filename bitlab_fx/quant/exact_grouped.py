"""Prepared (QAT) grouped expert projections, computed exactly as the converted grouped op computes them.

A mixture-of-experts projection holds every expert's weight in one 3-D tensor, viewed here as ``[E, N, K]`` (expert,
output, input). It is quantized **per expert**: one step per output channel of each expert (``per_channel``), per
group of each channel (``PerGroup``), or one per expert (``per_tensor``). The weight quantizer sees the stack as the
2-D matrix :func:`quantizer_view` gives (rows ``[E * N, K]``, or ``[E, N * K]`` with a per-channel spec standing for
per-expert ``per_tensor``), so its steps are the per-expert steps and its gradient is the ordinary
straight-through one, reaching the 3-D parameter.

:func:`grouped_linear` runs each expert on its block of routed rows (rows sorted by expert; ``group_ends`` says
where each block ends): the forward value is computed from the integer codes with :mod:`~bitlab_fx.quant.arithmetic`
(bit for bit the converted ``bitlab.<format>_grouped_linear``), the gradients are those of the per-expert
``F.linear`` of the fake-quantized values. A weight-only projection (no input quantizer), or one whose quantizers
are off or blending in, is that float call.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from . import arithmetic as A
from . import primitives as P
from .exact_layers import input_codes


def quantizer_view(weight: torch.Tensor, granularity) -> torch.Tensor:
    """The 2-D matrix an experts weight ``[E, N, K]`` is quantized as: ``[E * N, K]``, or ``[E, N * K]`` (one step
    per expert) for ``per_tensor``."""
    e, n, k = weight.shape
    return weight.reshape(e, n * k) if granularity == "per_tensor" else weight.reshape(e * n, k)


def quantizer_spec(spec):
    """The spec the weight quantizer applies to :func:`quantizer_view`: per expert ``per_tensor`` is per channel of
    the ``[E, N * K]`` view; any other spec is used as it is."""
    return dataclasses.replace(spec, granularity="per_channel") if spec.granularity == "per_tensor" else spec


def expert_steps(step: torch.Tensor, experts: int, n: int) -> torch.Tensor:
    """Steps of :func:`quantizer_view` per expert: ``[E, N]``, ``[E, N, G]`` or ``[E, 1]`` (the op's weight_scale)."""
    return step.reshape(experts, -1, step.shape[-1]) if step.dim() == 2 else step.reshape(experts, -1)


def per_expert(group_ends: List[int], fn: Callable[[int, int, int], torch.Tensor], like: torch.Tensor,
               n: int) -> torch.Tensor:
    """``fn(expert, start, end)`` for each expert with rows, concatenated in row order: ``[S, n]``."""
    pieces, start = [], 0
    for e, end in enumerate(group_ends):
        if end > start:
            pieces.append(fn(e, start, end))
        start = end
    return torch.cat(pieces) if pieces else like.new_zeros(like.shape[0], n)


def _exact(input_quantizer, weight_quantizer) -> bool:
    quantizers = (input_quantizer, weight_quantizer)
    if all(q is not None and q.enabled and q.mix >= 1.0 for q in quantizers):
        return True
    for q in quantizers:
        if q is not None:
            q.drop_codes()
    return False


def grouped_linear(x: torch.Tensor, group_ends: List[int], weight: torch.Tensor, bias: Optional[torch.Tensor],
                   input_quantizer, weight_quantizer, spec) -> torch.Tensor:
    """``y [S, N]``: expert ``e``'s rows of ``x [S, K]`` times its weight ``weight[e]`` (``[E, N, K]``, ``bias [E, N]``),
    fake-quantized by ``weight_quantizer`` (applied to :func:`quantizer_view`; None: float) with inputs quantized by
    ``input_quantizer`` (None: weight-only). ``spec``: the projection's weight spec (its granularity)."""
    e, n, k = weight.shape
    view = quantizer_view(weight, spec.granularity) if spec is not None else None
    w_fq = weight if weight_quantizer is None else weight_quantizer(view).reshape(e, n, k)
    x_fq = x if input_quantizer is None else input_quantizer(x)
    exact = _exact(input_quantizer, weight_quantizer)
    y_float = None
    if not exact or (torch.is_grad_enabled() and (x_fq.requires_grad or w_fq.requires_grad)):
        y_float = per_expert(group_ends, lambda i, s, t: F.linear(x_fq[s:t], w_fq[i], None if bias is None else bias[i]),
                             x, n)
    if not exact:
        return y_float
    with torch.no_grad():
        xq, mult = input_codes(x, input_quantizer, 1)
        wq, step = weight_quantizer.codes(view)
        wq, steps = wq.reshape(e, n, k), expert_steps(step, e, n)
        mult = mult.float().reshape(-1, 1)
        qmax = P.weight_qrange(spec)
        y = per_expert(group_ends, lambda i, s, t: A.linear_from_codes(
            xq[s:t], mult if mult.shape[0] == 1 else mult[s:t], wq[i], steps[i],
            None if bias is None else bias[i].detach(), x.dtype, qmax), x, n)
    return y if y_float is None else P.straight_through(y_float, y)
