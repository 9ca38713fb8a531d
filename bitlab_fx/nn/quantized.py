"""Inference modules that hold a converted layer's packed weights, scales and bias.

``convert`` puts one of these where each quantized ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` was. The graph calls
the ``torch.ops.bitlab`` op on their buffers directly (``get_attr`` nodes); their ``forward`` calls
the same op, so they also work as eager drop-in layers. No float copy of the weight is kept, unless
the graph also reads the layer's weight elsewhere (tied weights): convert then keeps it here as a
``weight`` buffer for those readers, with a warning.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops  # noqa: F401  (defines torch.ops.bitlab)
from ..errors import ConvertError
from ..quant import primitives as P
from ..quant.packing import FORMAT_VERSION, pack_int4, pack_ternary, unpack_int4, unpack_ternary


def _check_finite(weight: torch.Tensor, name: str) -> None:
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ConvertError(f"layer {name!r}: the weight has {bad} NaN/inf value(s) and cannot be quantized; "
                           "the training diverged or the checkpoint is corrupt: fix or reload the weights, "
                           "or exclude the layer with set_module_name(name, None)")


class _QuantizedBase(nn.Module):
    """Common state: the weight format, the activation mode and a format version in the state_dict."""

    weight_format: str  # "ternary" | "int4" (2..4-bit weights, two per byte) | "int8" (5..8-bit weights)

    def _init_common(self, spec, act: str, act_scale: Optional[torch.Tensor], name: str, rule: str):
        self.spec = spec
        self.act = act
        self.name = name
        self.rule = rule
        self.weight_format = "ternary" if spec.format == "ternary" else ("int4" if spec.bits <= 4 else "int8")
        self.register_buffer("act_scale", act_scale)

    def _store_weight(self, weight: torch.Tensor, weight_scale: Optional[torch.Tensor] = None):
        _check_finite(weight, self.name)
        wq, g = P.quantize_weight(weight, self.spec, weight_scale)
        self.register_buffer("weight_scale", g)
        flat = wq.reshape(wq.shape[0], -1)
        self.zero_fraction = float((flat == 0).float().mean()) if flat.numel() else 0.0
        if self.weight_format in ("ternary", "int4"):
            self.register_buffer("packed_weight", pack_ternary(flat) if self.weight_format == "ternary" else pack_int4(flat))
        else:
            self.register_buffer("qweight", wq.contiguous())

    @property
    def stored_weight(self) -> torch.Tensor:
        return self.qweight if self.weight_format == "int8" else self.packed_weight

    def int_weight(self) -> torch.Tensor:
        """The integer weight as int8 with the original shape (unpacked: for inspection and tests)."""
        if self.weight_format == "int8":
            return self.qweight
        k = math.prod(self.weight_shape[1:])
        unpack = unpack_ternary if self.weight_format == "ternary" else unpack_int4
        return unpack(self.packed_weight, k).reshape(self.weight_shape)

    def get_extra_state(self):
        return {"format_version": FORMAT_VERSION, "weight_format": self.weight_format,
                "weight_shape": list(self.weight_shape), "act": self.act}

    def set_extra_state(self, state):
        if state.get("format_version") != FORMAT_VERSION:
            raise ConvertError(f"layer {self.name!r}: packed format version {state.get('format_version')} does not match "
                               f"this bitlab_fx (version {FORMAT_VERSION}); re-convert the model with this version")
        if list(state.get("weight_shape", [])) != list(self.weight_shape) or state.get("weight_format") != self.weight_format:
            raise ConvertError(f"layer {self.name!r}: saved weight {state.get('weight_format')} {state.get('weight_shape')} "
                               f"does not match this layer ({self.weight_format} {list(self.weight_shape)}); load a "
                               "state_dict converted from the same model with the same qconfig")
        if "act" in state and state["act"] != self.act:
            raise ConvertError(f"layer {self.name!r}: the state_dict was converted with activation quantization "
                               f"{state['act']!r}, this layer uses {self.act!r}; load a state_dict converted with the "
                               "same qconfig (activation granularity and dynamic/static included)")

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) changes the compute dtype, never the precision of the scales:
        # they stay fp32 (so converted == prepared holds in any dtype); only their device follows.
        scales = {k: v for k, v in self._buffers.items() if v is not None and (k == "weight_scale" or k.startswith("act_scale"))}
        super()._apply(fn, recurse)
        for k, old in scales.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        return self

    def packed_bytes(self) -> int:
        """Bytes of the stored weight, scales, bias and static activation scale."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))


class QuantizedLinear(_QuantizedBase):
    """A converted linear layer: ``y = bitlab.ternary_linear(x, packed_weight, weight_scale, bias)``."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], spec, act: str = "per_token",
                 act_scale: Optional[torch.Tensor] = None, name: str = "", rule: str = "",
                 weight_scale: Optional[torch.Tensor] = None):
        super().__init__()
        self._init_common(spec, act, act_scale, name, rule)
        self.out_features, self.in_features = weight.shape
        self.weight_shape: Tuple[int, ...] = tuple(weight.shape)
        self._store_weight(weight.detach(), weight_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_format == "ternary":
            return torch.ops.bitlab.ternary_linear(x, self.packed_weight, self.weight_scale, self.bias, self.act,
                                                   self.act_scale, self.in_features)
        if self.weight_format == "int4":
            return torch.ops.bitlab.int4_linear(x, self.packed_weight, self.weight_scale, self.bias, self.act,
                                                self.act_scale, self.in_features)
        return torch.ops.bitlab.int8_linear(x, self.qweight, self.weight_scale, self.bias, self.act, self.act_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight_format}({self.spec.granularity}), act={self.act}")


class QuantizedConv2d(_QuantizedBase):
    """A converted conv2d layer (``bitlab.ternary_conv2d`` / ``bitlab.int8_conv2d``)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], spec, stride, padding, dilation, groups,
                 act: str = "per_token", act_scale: Optional[torch.Tensor] = None, name: str = "", rule: str = "",
                 weight_scale: Optional[torch.Tensor] = None):
        super().__init__()
        self._init_common(spec, act, act_scale, name, rule)
        self.weight_shape = tuple(weight.shape)
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * groups
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups
        self._store_weight(weight.detach(), weight_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def op_args(self) -> tuple:
        """Arguments after (x, weight, weight_scale, bias) of this layer's op."""
        geometry = (self.stride, self.padding, self.dilation, self.groups, self.act)
        if self.weight_format != "int8":  # packed formats need the unpacked shape
            return (list(self.weight_shape),) + geometry
        return geometry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_op(self.weight_format)(x, self.stored_weight, self.weight_scale, self.bias, *self.op_args(),
                                             self.act_scale)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.weight_shape[2:])}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, groups={self.groups}, "
                f"weight={self.weight_format}({self.spec.granularity}), act={self.act}")


_CONV2D_OPS = {"ternary": torch.ops.bitlab.ternary_conv2d, "int4": torch.ops.bitlab.int4_conv2d,
               "int8": torch.ops.bitlab.int8_conv2d}


def conv2d_op(weight_format: str):
    """The ``torch.ops.bitlab`` conv2d op of a weight format ("ternary" | "int4" | "int8")."""
    return _CONV2D_OPS[weight_format]


def conv1d_as_conv2d(weight_format: str, x: torch.Tensor, weight: torch.Tensor, *args) -> torch.Tensor:
    """A conv1d through the packed conv2d op on a height-1 image: ``[N, C, L] -> [N, C, 1, L]`` (an unbatched
    ``[C, L]`` too), the weight stored as ``[out, in/groups, 1, k]``. What converted conv1d layers call."""
    unbatched = x.dim() == 2
    x4 = (x.unsqueeze(0) if unbatched else x).unsqueeze(2)
    y = conv2d_op(weight_format)(x4, weight, *args).squeeze(2)
    return y.squeeze(0) if unbatched else y


class QuantizedConv1d(QuantizedConv2d):
    """A converted conv1d layer: stored and run as a conv2d of kernel ``(1, k)`` on a height-1 image
    (:func:`conv1d_as_conv2d`), so it shares the conv2d kernels and packed format."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], spec, stride, padding, dilation, groups,
                 act: str = "per_token", act_scale: Optional[torch.Tensor] = None, name: str = "", rule: str = "",
                 weight_scale: Optional[torch.Tensor] = None):
        (s,), (p,), (d,) = tuple(stride), tuple(padding), tuple(dilation)
        super().__init__(weight.unsqueeze(2), bias, spec, (1, s), (0, p), (1, d), groups, act, act_scale, name, rule,
                         weight_scale)

    def int_weight(self) -> torch.Tensor:
        """The integer weight as int8 ``[out, in/groups, k]``."""
        return super().int_weight().squeeze(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv1d_as_conv2d(self.weight_format, x, self.stored_weight, self.weight_scale, self.bias,
                                *self.op_args(), self.act_scale)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({self.weight_shape[3]},), "
                f"stride=({self.stride[1]},), padding=({self.padding[1]},), groups={self.groups}, "
                f"weight={self.weight_format}({self.spec.granularity}), act={self.act}")
