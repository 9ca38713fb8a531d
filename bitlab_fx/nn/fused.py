"""Sibling linear layers stored as one matrix: what ``convert`` calls once for layers that read the same input.

The q/k/v projections of an attention block, the gate/up projections of a gated MLP: converted layers that
take the same input with the same activation quantization. :class:`FusedLinears` holds their packed weights,
steps and biases concatenated along the output rows, and each member layer's buffers become views of its
rows of those: one copy in memory, the members' ``state_dict`` keys and ``bfx.summary`` rows unchanged,
``load_state_dict`` writes through to the fused rows. One op call computes all outputs (one activation
quantization, one pass of the kernel's threads over all rows); each member's output is a slice of it,
equal to the member's own call (rows are independent).

Moving the model (``.to(device)``) moves each buffer on its own; :meth:`FusedLinears._apply` runs after the
members' (it is registered after them) and makes their buffers views of its rows again.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..ops.cpu import direct as direct_cpu
from .quantized import QuantizedLinear, apply_keeping_dtype


def fusable(layer: nn.Module) -> bool:
    """Whether a converted layer can be a member: a linear layer with one step per row or per group of a row
    and no static activation multiplier (a per-tensor step or multiplier is one number per layer), so no integer
    bias codes either (their step involves the multiplier), no per-token IntBias and 8-bit activation codes."""
    return (isinstance(layer, QuantizedLinear) and layer._buffers["act_multiplier"] is None
            and layer._buffers.get("bias_codes") is None and layer.bias_bits == 0 and layer.act_bits == 8
            and layer.weight_scale.dim() >= 1 and layer.weight_scale.shape[0] == layer.out_features
            and layer.out_features > 1)


def fusion_key(layer: QuantizedLinear) -> tuple:
    """Layers with equal keys can share one op call (same format, input width, activation mode, step shape)."""
    return (layer.weight_format, layer.in_features, layer.act, tuple(layer.weight_scale.shape[1:]),
            layer.weight_scale.dtype, layer.stored_weight.dtype, layer.stored_weight.shape[1:])


class FusedLinears(nn.Module):
    """The concatenated rows of sibling converted linear layers (see the module docstring).

    Its buffers are not persistent: the members' own keys save and load the same values."""

    def __init__(self, members: List[QuantizedLinear], names: List[str]):
        super().__init__()
        keys = {fusion_key(m) for m in members}
        if len(members) < 2 or len(keys) != 1 or not all(fusable(m) for m in members):
            raise ValueError(f"FusedLinears({names}): members must be 2+ fusable layers of one fusion key")
        self.__dict__["members"] = list(members)  # not submodules: they stay where they are in the model
        self.names = list(names)
        self.out_features = [m.out_features for m in members]
        self.in_features = members[0].in_features
        self.act = members[0].act
        buffer = members[0].format.buffer
        self.register_buffer(buffer, torch.cat([m.stored_weight for m in members]), persistent=False)
        self.register_buffer("weight_scale", torch.cat([m.weight_scale for m in members]), persistent=False)
        self.register_buffer("bias", self._cat_biases(members), persistent=False)
        self._point_members_at_rows()

    @staticmethod
    def _cat_biases(members: List[QuantizedLinear]) -> Optional[torch.Tensor]:
        biases = [m.bias for m in members]
        if all(b is None for b in biases):
            return None
        like = next(b for b in biases if b is not None)
        return torch.cat([b if b is not None else like.new_zeros(m.out_features) for b, m in zip(biases, members)])

    def _point_members_at_rows(self) -> None:
        self.__dict__["_row_calls"] = {}  # rows_call's prepared arguments, made again from the new buffers
        buffer, start = self.members[0].format.buffer, 0
        for m, n in zip(self.members, self.out_features):
            m._buffers[buffer] = self._buffers[buffer][start:start + n]
            m._buffers["weight_scale"] = self._buffers["weight_scale"][start:start + n]
            if m._buffers["bias"] is not None:
                m._buffers["bias"] = self._buffers["bias"][start:start + n]
            start += n

    def op_call(self, x, read=None):
        """``(op, args, kwargs)`` of the one call computing every member's output, concatenated on the last dim."""
        read = read or self._buffers.__getitem__
        first = self.members[0]
        head = (x, read(first.format.buffer), read("weight_scale"), read("bias") if self.bias is not None else None)
        op, args = first._op_and_args(head, self.act)
        return op, args, {}

    def rows_call(self, x: torch.Tensor, first: int, last: int) -> Tuple[torch.Tensor, ...]:
        """The outputs of members ``first..last`` (consecutive) on ``x``: one op call on their rows (its arguments
        prepared once per row range: this runs once per token in eager decoding)."""
        cache = self.__dict__.setdefault("_row_calls", {})
        prepared = cache.get((first, last))
        if prepared is None:
            prepared = cache[(first, last)] = self._prepare_rows(first, last)
        op, args, fmt, splits = prepared
        y = None
        if direct_cpu.eligible(x):  # eager CPU inference without the C++ kernels: skip the dispatcher (nn.quantized)
            y = direct_cpu.linear(fmt, x, args[0], args[1], args[2], self.act, None, self.in_features)
        if y is None:
            y = op(x, *args)
        # contiguous like each member's own output (model code may .view() it); a no-op for one token
        return tuple(part.contiguous() for part in y.split(splits, dim=-1)) if len(splits) > 1 else (y,)

    def _prepare_rows(self, first: int, last: int) -> tuple:
        start, stop = sum(self.out_features[:first]), sum(self.out_features[:last + 1])
        m0, b = self.members[0], self._buffers
        weight, scale = b[m0.format.buffer][start:stop], b["weight_scale"][start:stop]
        bias = None if b["bias"] is None else b["bias"][start:stop]
        op, args = m0._op_and_args((None, weight, scale, bias), self.act)
        return op, args[1:], m0.weight_format, self.out_features[first:last + 1]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Every member's output on ``x`` (contiguous, like each member's own)."""
        return list(self.rows_call(x, 0, len(self.members) - 1))

    def __getstate__(self):  # the prepared calls hold op objects, which do not pickle: made again after loading
        state = self.__dict__.copy()
        state.pop("_row_calls", None)
        return state

    def _apply(self, fn, recurse=True):
        apply_keeping_dtype(self, fn, recurse, ["weight_scale"])  # (the steps stay fp32, as in the members)
        self._point_members_at_rows()
        return self

    def extra_repr(self) -> str:
        return f"{' + '.join(self.names)}: in_features={self.in_features}, out_features={self.out_features}"
