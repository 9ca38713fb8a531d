"""The lean decode step: a converted Llama-family model's token, computed straight from its converted layers.

Per decoder layer: RMSNorm, one op call for q/k/v, the rotary embedding on q and k together (written back
into the op's output), the new key and value written in place into the layer's preallocated cache ``[2 (keys,
values), kv_heads, max_len, head_dim]`` in one copy, attention over the filled prefix only (a prompt: SDPA;
one query: two batched matmuls, GQA without repeating the keys), the o projection, the residual, RMSNorm, one
op call for gate/up, activation times up, down, the residual: about 25 torch calls, against HF's ~60 module
and function calls with masks, cache objects and ``generate`` bookkeeping around them. The arithmetic is HF's:
the same formulas in the same order (``torch.rms_norm`` computes HF's fp32 RMSNorm, ``weight * (x *
rsqrt(mean(x^2) + eps))``, in one call), the rotary tables from the model's own rotary module; attention sums
in another order than HF's SDPA call, so logits differ from HF's by float rounding (tests/lean/test_engine.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .plan import Plan


class LeanDecoder:
    """Runs :class:`~bitlab_fx.lean.plan.Plan` on batch-1 sequences of up to :attr:`max_len` positions."""

    def __init__(self, plan: Plan, max_len: int):
        self.plan, self.max_len = plan, max_len
        p = plan
        self.q_width, self.qk_width = p.heads * p.head_dim, (p.heads + p.kv_heads) * p.head_dim
        # keys and values of a layer side by side ([2, kv_heads, max_len, head_dim]): one write per token; a tensor of
        # its own per layer (views of one tensor would be aliased inputs to a compiled step, which then copies them)
        self.cache = [torch.zeros(2, p.kv_heads, max_len, p.head_dim) for _ in p.layers]
        self.cos, self.sin_signed = _rope_tables(p.rotary, max_len, p.head_dim)
        self._steps = list(zip(p.layers, self.cache))
        self._norm_shape = tuple(p.final_norm.shape)
        self._zero = torch.zeros(1)  # (baddbmm's ignored addend)
        self._positions = torch.arange(max_len)

    def forward(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Logits ``[vocab]`` of the last of ``ids`` (``[n]`` tokens at positions ``position..position + n - 1``,
        after the cache holds the ``position`` before them); writes their keys and values into the cache."""
        n, end = ids.shape[0], position + ids.shape[0]
        cos, sin = self.cos[position:end], self.sin_signed[position:end]
        mask = None if n == 1 else _causal_mask(position, n, end)
        return self._layers(ids, lambda qkv, cache: self._attention(qkv, cache, position, end, cos, sin, mask))

    def step(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of one token ``ids [1]`` at ``position`` (a ``[1]`` int64 tensor) with every shape fixed
        (attention over the whole cache, the positions after ``position`` masked out): the form ``torch.compile``
        turns into one graph for every step (``compiled.py``)."""
        cos, sin = self.cos.index_select(0, position), self.sin_signed.index_select(0, position)
        hidden = torch.where(self._positions <= position, 0.0, float("-inf"))  # [max_len] added to the scores
        return self._layers(ids, lambda qkv, cache: self._attention_static(qkv, cache, position, cos, sin, hidden))

    def _layers(self, ids: torch.Tensor, attention) -> torch.Tensor:
        """The decoder layers on ``ids``' embeddings and the head on the last position; ``attention(qkv, cache)``
        rotates q/k, writes the new keys and values into the layer's cache and attends."""
        p, shape = self.plan, self._norm_shape
        eps, width = p.eps, p.intermediate
        x = p.embed(ids)  # [n, hidden]
        for layer, cache in self._steps:
            qkv = layer.qkv(torch.rms_norm(x, shape, layer.input_norm, eps))
            x.add_(layer.o(attention(qkv, cache)))
            gate_up = layer.gate_up(torch.rms_norm(x, shape, layer.post_norm, eps))
            x.add_(layer.down(p.act(gate_up[:, :width]) * gate_up[:, width:]))
        return p.head(torch.rms_norm(x[-1:], shape, p.final_norm, eps))[0]

    def _rotate(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Applies the rotary embedding to the q and k heads of ``qkv`` in place; returns the new keys and values
        ``[2, kv_heads, n, head_dim]`` (a view of ``qkv``).
        Each view is one as_strided call where slicing, viewing and permuting would take two to four (every torch
        call costs ~1-2 us of Python and dispatch, as much as the arithmetic of these small tensors).
        qkv: [n, width] rows of q heads | k heads | v heads."""
        p, n, d, kvh = self.plan, qkv.shape[0], self.plan.head_dim, self.plan.kv_heads
        width = qkv.shape[1]
        qk = qkv.as_strided((n, p.heads + kvh, d), (width, d, 1), qkv.storage_offset())  # q and k heads
        _rotary(qk, cos, sin, out=qk)
        return qkv.as_strided((2, kvh, n, d), (kvh * d, d, width, 1), qkv.storage_offset() + self.q_width)

    def _grouped_query(self, qkv: torch.Tensor) -> torch.Tensor:
        """One query's heads as ``[kv_heads, heads per kv head, head_dim]``: each kv head's group of query heads as
        the rows of one matmul (SDPA's CPU path for one query and GQA repeats the keys per query head, ~3x slower)."""
        p, d, kvh = self.plan, self.plan.head_dim, self.plan.kv_heads
        return qkv.as_strided((kvh, p.heads // kvh, d), ((p.heads // kvh) * d, d, 1), qkv.storage_offset())

    def _attention_static(self, qkv: torch.Tensor, cache: torch.Tensor, position: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """One query against the whole cache ``[2, kv_heads, max_len, head_dim]``, ``hidden`` (0 or -inf per
        position) added to the scores: fixed shapes, and views torch.compile traces (slices, not as_strided)."""
        p, d, kvh = self.plan, self.plan.head_dim, self.plan.kv_heads
        qk = _rotary(qkv[:, :self.qk_width].view(1, p.heads + kvh, d), cos, sin)
        new_kv = torch.cat([qk[:, p.heads:], qkv[:, self.qk_width:].view(1, kvh, d)]).view(2, kvh, 1, d)
        cache.index_copy_(2, position, new_kv)
        q = qk[0, :p.heads].view(kvh, p.heads // kvh, d)
        scores = torch.baddbmm(hidden, q, cache[0].transpose(1, 2), alpha=p.scaling)
        return torch.bmm(scores.softmax(-1), cache[1]).view(1, self.q_width)

    def _attention(self, qkv: torch.Tensor, cache: torch.Tensor, position: int, end: int, cos: torch.Tensor,
                   sin: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        # cache: [2 (keys, values), kv_heads, max_len, head_dim]; attention over the filled prefix only
        p, n, d, kvh = self.plan, qkv.shape[0], self.plan.head_dim, self.plan.kv_heads
        row, base = cache.stride(1), cache.storage_offset()
        new_kv = self._rotate(qkv, cos, sin)
        cache.as_strided((2, kvh, n, d), (kvh * row, row, d, 1), base + position * d).copy_(new_kv)
        if n == 1:  # one query
            keys_t = cache.as_strided((kvh, d, end), (row, 1, d), base)
            values = cache.as_strided((kvh, end, d), (row, d, 1), base + kvh * row)
            scores = torch.baddbmm(self._zero, self._grouped_query(qkv), keys_t, beta=0.0, alpha=p.scaling)
            return torch.bmm(scores.softmax(-1), values).view(1, self.q_width)
        kv = cache[:, :, :end]  # the filled prefix only
        q = qkv[:, :self.q_width].view(n, p.heads, p.head_dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=p.scaling,
                                             enable_gqa=p.heads != p.kv_heads)
        return out.transpose(0, 1).reshape(n, self.q_width)


def _rotary(qk: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, out: Optional[torch.Tensor] = None):
    """HF's rotary embedding ``(x * cos) + (rotate_half(x) * sin)`` on heads ``qk [n, heads, head_dim]``, written as
    ``x * cos + roll(x, head_dim / 2) * sin_signed`` (``rotate_half(x) * sin == roll(x) * sin_signed``)."""
    return torch.add(qk * cos, qk.roll(qk.shape[-1] // 2, -1) * sin_signed, out=out)


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
