"""The losses of knowledge distillation from a float teacher to a quantized student (logits and hidden states).

>>> import torch
>>> from bitlab_fx.recipes.losses import kl_logits
>>> t = torch.randn(2, 5, 11)
>>> float(kl_logits(t, t, temperature=2.0))       # the same distribution: nothing to learn
0.0
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def kl_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(teacher || student)`` of the softened next-token distributions, averaged over tokens, times ``T**2``
    (Hinton et al. 2015: keeps the gradient's size independent of the temperature). Logits ``[..., vocab]``;
    computed in fp32 whatever their dtype."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = F.kl_div(s, p, log_target=True, reduction="none").sum(-1)
    return per_token.mean() * (t * t)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The plain next-token cross-entropy of ``logits [B, T, V]`` on ``ids [B, T]`` (position t predicts t + 1)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``mse(student, teacher) / mean(teacher**2)``: each layer's error relative to its own
    scale, so layers whose activations grow (the residual stream does) do not dominate."""
    terms = [F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp(min=1e-12)
             for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(terms).mean()
