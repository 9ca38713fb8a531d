"""The lean decode step: a converted Llama-family model's token, computed straight from its converted layers.

Per decoder layer: RMSNorm, one op call for q/k/v, rotary embedding on q and k together, the new key and value
written in place into a preallocated cache ``[layers, kv_heads, max_len, head_dim]``, attention over the filled
prefix only, the o projection, the residual, RMSNorm, one op call for gate/up, activation times up, down, the
residual: about twenty torch calls, against HF's ~60 module and function calls with masks, cache objects and
``generate`` bookkeeping around them. The arithmetic is HF's (same formulas in the same order; the rotary
tables come from the model's own rotary module), except attention (explicit for one query, SDPA for a prompt:
HF's SDPA call differs from it in float rounding only).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from .plan import Plan


class LeanDecoder:
    """Runs :class:`~bitlab_fx.lean.plan.Plan` on batch-1 sequences of up to :attr:`max_len` positions."""

    def __init__(self, plan: Plan, max_len: int):
        self.plan, self.max_len = plan, max_len
        p = plan
        self.q_width, self.qk_width = p.heads * p.head_dim, (p.heads + p.kv_heads) * p.head_dim
        self.groups = p.heads // p.kv_heads
        shape = (len(p.layers), p.kv_heads, max_len, p.head_dim)
        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)
        self.cos, self.sin_signed = _rope_tables(p.rotary, max_len, p.head_dim)

    def forward(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Logits ``[vocab]`` of the last of ``ids`` (``[n]`` tokens at positions ``position..position + n - 1``,
        after the cache holds the ``position`` before them); writes their keys and values into the cache."""
        p = self.plan
        x = p.embed(ids)  # [n, hidden]
        n = x.shape[0]
        cos, sin = self.cos[position:position + n], self.sin_signed[position:position + n]
        for i, layer in enumerate(p.layers):
            h = _rms_norm(x, layer.input_norm, p.eps)
            x.add_(layer.o(self._attention(layer.qkv(h), i, position, n, cos, sin)))
            h = _rms_norm(x, layer.post_norm, p.eps)
            gate_up = layer.gate_up(h)
            x.add_(layer.down(p.act(gate_up[:, :p.intermediate]) * gate_up[:, p.intermediate:]))
        return p.head(_rms_norm(x[-1:], p.final_norm, p.eps))[0]

    def _attention(self, qkv: torch.Tensor, layer: int, position: int, n: int, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
        p = self.plan
        qk = qkv[:, :self.qk_width].view(n, -1, p.head_dim)  # q heads then k heads
        # HF's (x * cos) + (rotate_half(x) * sin): rotate_half(x) * sin == roll(x) * sin_signed, bitwise
        qk = qk * cos + qk.roll(p.head_dim // 2, -1) * sin
        end = position + n
        keys, values = self.keys[layer], self.values[layer]
        keys[:, position:end] = qk[:, p.heads:].transpose(0, 1)
        values[:, position:end] = qkv[:, self.qk_width:].view(n, p.kv_heads, p.head_dim).transpose(0, 1)
        keys, values = keys[:, :end], values[:, :end]
        if n == 1:  # one query: each kv head's group of query heads as the rows of one matmul
            q = qk[0, :p.heads].view(p.kv_heads, self.groups, p.head_dim)
            scores = torch.bmm(q, keys.transpose(1, 2)).mul_(p.scaling)
            return torch.bmm(scores.softmax(-1), values).view(1, self.q_width)
        q = qk[:, :p.heads].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
        out = F.scaled_dot_product_attention(q, keys.unsqueeze(0), values.unsqueeze(0), attn_mask=_causal_mask(
            position, n, end), scale=p.scaling, enable_gqa=self.groups > 1)
        return out[0].transpose(0, 1).reshape(n, self.q_width)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's fp32 RMSNorm, ``weight * (x * rsqrt(mean(x^2) + eps))``, in one op (equal on fp32, tested)."""
    return torch.rms_norm(x, weight.shape, weight, eps)


def _rope_tables(rotary: torch.nn.Module, length: int, head_dim: int):
    """(cos, sin with its first half negated) ``[length, 1, head_dim]`` from the model's rotary module, for all
    positions at once (each value depends on its position alone: the same bits HF computes call by call)."""
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    cos, sin = cos[0].float(), sin[0].float()
    half = head_dim // 2
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return cos[:, None].contiguous(), sin[:, None].contiguous()


def _causal_mask(position: int, n: int, end: int) -> torch.Tensor:
    """``[n, end]`` bool: query ``position + i`` sees keys ``0..position + i`` (SDPA's ``is_causal`` aligns the
    queries to the first keys, wrong after a cached prefix)."""
    keys = torch.arange(end)
    return keys[None, :] <= (position + torch.arange(n))[:, None]


def cache_length(length: int) -> int:
    """Positions a new cache holds for a call of ``length``: the next power of two, at least 128 (kept and reused
    by later calls that fit; attention reads only the filled prefix, so a longer cache costs memory, not time)."""
    return max(128, 1 << max(0, math.ceil(math.log2(max(length, 1)))))
