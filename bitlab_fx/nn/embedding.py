"""Quantized token embeddings: the prepared (fake-quant) and converted (packed gather) forms of ``nn.Embedding``.

An embedding row is looked up, not multiplied: its weight is quantized (int8, int4 or ternary, one step per
row or per group of a row) and there is no activation to quantize. ``prepare_qat`` puts a
:class:`FakeQuantEmbedding` where an ``nn.Embedding`` is named by a rule (``set_object_type(nn.Embedding,
...)``, ``set_module_name``, a pattern; never the global default), ``convert`` a :class:`QuantizedEmbedding`
holding the packed codes: a lookup gathers the packed rows and dequantizes only them.

>>> import torch, bitlab_fx as bfx
>>> emb = torch.nn.Embedding(100, 64)
>>> q = QuantizedEmbedding.from_float(emb, bfx.IntWeight(bits=8))
>>> ids = torch.tensor([[3, 7, 7]])
>>> q(ids).shape, q.packed_bytes() < emb.weight.numel() * 4 / 3.7  # 64 codes + one fp32 step a row
(torch.Size([1, 3, 64]), True)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvertError
from ..quant import primitives as P
from ..quant.fake_quant import WeightFakeQuant
from ..quant.formats import WeightFormat, format_of
from ..quant.packing import FORMAT_VERSION
from .quantized import apply_keeping_dtype


def _row_local(spec) -> bool:
    """Whether a row's codes depend on that row alone (one step per row or per group of a row)."""
    return str(spec.granularity) != "per_tensor" and not spec.learned


class FakeQuantEmbedding(nn.Module):
    """A prepared embedding: looks up rows of the fake-quantized weight (straight-through gradient to
    ``weight``, which stays the original parameter, so a weight tied to the LM head trains as one).

    With a per-row or per-group step only the looked-up rows are fake-quantized (their codes depend on the
    row alone); a per-tensor or learned step quantizes the whole table."""

    def __init__(self, embedding: nn.Embedding, spec, name: str = "", rule: str = ""):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.scale_grad_by_freq, self.sparse = embedding.scale_grad_by_freq, embedding.sparse
        self.weight = embedding.weight  # the same Parameter (ties kept)
        self.weight_fq = WeightFakeQuant(spec, layer=name, rule=rule, weight=embedding.weight.detach())
        self.spec, self.name, self.rule = spec, name, rule

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _row_local(self.spec):
            rows = F.embedding(ids, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)
            return self.weight_fq(rows.reshape(-1, self.embedding_dim)).reshape(rows.shape)
        return F.embedding(ids, self.weight_fq(self.weight), self.padding_idx, None, 2.0, self.scale_grad_by_freq,
                           self.sparse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.spec}"


class QuantizedEmbedding(nn.Module):
    """A converted embedding: packed codes (the weight format's buffer) and fp32 steps ``weight_scale``.

    ``forward(ids)`` gathers the packed rows of ``ids``, unpacks and dequantizes them: exactly the prepared
    model's lookup. The output dtype follows the model's (``model.to(torch.bfloat16)``): an empty ``weight``
    buffer of that dtype stands where the float table was, for code that reads ``embedding.weight.dtype``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec, stored: torch.Tensor,
                 weight_scale: torch.Tensor, padding_idx: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 name: str = "", rule: str = ""):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.spec, self.name, self.rule = spec, name, rule
        self.weight_format = format_of(spec).name
        self.weight_shape = (num_embeddings, embedding_dim)
        self.register_buffer(self.format.buffer, stored)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=stored.device), persistent=False)

    @classmethod
    def from_float(cls, embedding: nn.Module, spec, weight_fq: Optional[WeightFakeQuant] = None, name: str = "",
                   rule: str = "") -> "QuantizedEmbedding":
        """Quantize an ``nn.Embedding`` (or a :class:`FakeQuantEmbedding`'s weight, with its quantizer's step)."""
        weight = embedding.weight.detach()
        if not torch.isfinite(weight).all():
            raise ConvertError(f"embedding {name!r}: the weight has NaN/inf values and cannot be quantized; fix or "
                               "reload the weights, or leave the embedding float (no rule for it)")
        learned = weight_fq.step(weight) if weight_fq is not None and spec.learned else None
        wq, step = P.quantize_weight(weight.float(), spec, learned)
        fmt = format_of(spec)
        return cls(embedding.num_embeddings, embedding.embedding_dim, spec, fmt.store(wq), step,
                   embedding.padding_idx, weight.dtype, name, rule)

    @property
    def format(self) -> WeightFormat:
        return format_of(self.spec)

    @property
    def stored_weight(self) -> torch.Tensor:
        return self._buffers[self.format.buffer]

    def int_weight(self) -> torch.Tensor:
        """The integer codes as int8 ``[num_embeddings, embedding_dim]`` (for inspection and tests)."""
        return self.format.load(self.stored_weight, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = self.format.load(self.stored_weight.index_select(0, flat), self.embedding_dim)
        scale = self._buffers["weight_scale"]
        step = scale if scale.numel() == 1 else scale.index_select(0, flat)
        rows = P.dequantize_weight(codes, step, self.spec.granularity)
        return rows.to(self._buffers["weight"].dtype).reshape(*ids.shape, self.embedding_dim)

    def packed_bytes(self) -> int:
        """Bytes of the stored codes and steps."""
        return sum(t.numel() * t.element_size() for k, t in self._buffers.items() if k != "weight")

    @property
    def zero_fraction(self) -> float:
        return float((self.int_weight() == 0).float().mean())

    def get_extra_state(self):
        return {"format_version": FORMAT_VERSION, "weight_format": self.weight_format,
                "weight_shape": list(self.weight_shape)}

    def set_extra_state(self, state):
        if state.get("format_version") != FORMAT_VERSION or list(state.get("weight_shape", [])) != list(
                self.weight_shape) or state.get("weight_format") != self.weight_format:
            raise ConvertError(f"embedding {self.name!r}: saved {state.get('weight_format')} "
                               f"{state.get('weight_shape')} (packed format {state.get('format_version')}) does not "
                               f"match this embedding ({self.weight_format} {list(self.weight_shape)}, packed format "
                               f"{FORMAT_VERSION}); load a file converted from the same model with the same qconfig")

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, fn, recurse, ["weight_scale"])

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight_format}({self.spec.granularity}), "
                f"{math.prod(self.weight_shape):,} codes")
