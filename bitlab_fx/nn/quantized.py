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
from ..ops.cpu import direct as direct_cpu
from ..quant import primitives as P
from ..quant.formats import WEIGHT_FORMATS, WeightFormat, format_of
from ..quant.packing import FORMAT_VERSION


def _check_finite(weight: torch.Tensor, name: str) -> None:
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ConvertError(f"layer {name!r}: the weight has {bad} NaN/inf value(s) and cannot be quantized; "
                           "the training diverged or the checkpoint is corrupt: fix or reload the weights, "
                           "or exclude the layer with set_module_name(name, None)")


# state_dict keys of files written before the static multiplier had its own name (same packed format)
LEGACY_KEYS = {"act_scale_static": "act_multiplier"}


def upgrade_legacy_keys(state: dict, prefix: str) -> None:
    """Rename a converted layer's old state_dict keys (at ``prefix``) in place, so older files still load."""
    for old, new in LEGACY_KEYS.items():
        if prefix + old in state and prefix + new not in state:
            state[prefix + new] = state.pop(prefix + old)


def apply_keeping_dtype(module: nn.Module, fn, recurse: bool, names) -> nn.Module:
    """``nn.Module._apply`` (what ``.to()``/``.half()``/``.cuda()`` run) that keeps the dtype of the buffers ``names``:
    model.to(torch.bfloat16) changes the compute dtype, never the precision of the scales, which stay fp32 (so
    converted == prepared holds in any dtype); only their device follows. For every module holding steps."""
    kept = {k: module._buffers[k] for k in names if module._buffers.get(k) is not None}
    nn.Module._apply(module, fn, recurse)
    for k, old in kept.items():
        new = module._buffers[k]
        if new.dtype != old.dtype:
            module._buffers[k] = old.to(device=new.device)
    return module


_NO_KWARGS: dict = {}  # read only
_OWN = object()  # op_call default: this layer's own bias / activation mode / static multiplier


class _QuantizedBase(nn.Module):
    """Common state: the weight format, the activation mode and a format version in the state_dict.

    ``op_call`` is the one place that says which ``torch.ops.bitlab`` op runs this layer with which
    arguments: ``forward`` calls it on tensors, and ``convert`` emits it into the graph on ``get_attr``
    nodes, so calling a converted layer directly is exactly the computation its graph node runs."""

    weight_format: str  # "ternary" | "int4" (2..4-bit weights, two per byte) | "int8" (5..8-bit weights)
    act_bits: int = 8  # class defaults: layers pickled before schema version 4 have no attributes of their own
    bias_bits: int = 0

    def _init_common(self, spec, act: str, act_multiplier: Optional[torch.Tensor], name: str, rule: str):
        self.spec = spec
        self.act = act
        self.name = name
        self.rule = rule
        self.weight_format = format_of(spec).name
        # the static activation multiplier (``xq = round(x * act_multiplier)``; act="per_tensor"), or None
        self.register_buffer("act_multiplier", act_multiplier)
        self.act_bits = 8  # the bits of the activation codes the op computes (a fused dynamic quantizer's, 2..8)
        self.bias_bits = 0  # > 0: an IntBias on a per-token input step, quantized by the op at run time

    @property
    def format(self) -> WeightFormat:
        return format_of(self.spec)

    def _store_weight(self, weight: torch.Tensor, weight_scale: Optional[torch.Tensor] = None):
        _check_finite(weight, self.name)
        wq, g = P.quantize_weight(weight, self.spec, weight_scale)
        self.register_buffer("weight_scale", g)
        flat = wq.reshape(wq.shape[0], -1)
        self.zero_fraction = float((flat == 0).float().mean()) if flat.numel() else 0.0
        self.register_buffer(self.format.buffer, self.format.store(flat if self.format.packed else wq))

    def _store_bias(self, bias: Optional[torch.Tensor], bias_codes: Optional[torch.Tensor]) -> None:
        """A float ``bias``, or an IntBias as int32 ``bias_codes`` on the step :attr:`bias_step`, which the op adds
        to its integer sums (the float ``bias`` buffer is then None). An IntBias on a per-token input step
        (:attr:`bias_bits` > 0) is stored as the float bias: its codes depend on each token's step, so the op
        makes them at run time."""
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("bias_codes", None if bias_codes is None else bias_codes.to(torch.int32).clone())

    @property
    def bias_step(self) -> Optional[torch.Tensor]:
        """The step of the integer bias codes, ``weight_scale / act_multiplier`` (input step times weight step;
        ``[N]`` or ``[1]``): ``bias_codes * bias_step`` is the bias. None without integer bias codes."""
        if self._buffers.get("bias_codes") is None:
            return None
        return self.weight_scale.float().reshape(-1) / self.act_multiplier.float().reshape(-1)

    @property
    def bias_kind(self) -> str:
        """How the bias is added: ``"none"``, ``"float"``, ``"int32 codes"`` (an IntBias on a static input step) or
        ``"IntBias(8) per token"`` (stored float, quantized per token by the op)."""
        if self._buffers.get("bias_codes") is not None:
            return "int32 codes"
        if self._buffers.get("bias") is None:
            return "none"
        return f"IntBias({self.bias_bits}) per token" if self.bias_bits else "float"

    @property
    def stored_bias(self) -> Optional[torch.Tensor]:
        """The bias as stored: int32 codes (an IntBias) or float values, or None."""
        codes = self._buffers.get("bias_codes")
        return codes if codes is not None else self._buffers.get("bias")

    @property
    def stored_weight(self) -> torch.Tensor:
        return getattr(self, self.format.buffer)

    def int_weight(self) -> torch.Tensor:
        """The integer weight as int8 with the original shape (unpacked: for inspection and tests)."""
        k = math.prod(self.weight_shape[1:])
        return self.format.load(self.stored_weight, k).reshape(self.weight_shape)

    def _own(self, name: str, read):
        return read(name) if self._buffers.get(name) is not None else None

    def op_call(self, x, read=None, *, bias=_OWN, act=_OWN, act_multiplier=_OWN, bias_codes=_OWN, act_bits=_OWN,
                bias_bits=_OWN):
        """``(op, args, kwargs)`` of this layer on input ``x``. ``read(name)`` fetches a buffer (default: the tensor;
        ``convert`` passes one that makes a ``get_attr`` node). ``bias``/``act``/``act_multiplier``/``bias_codes``/
        ``act_bits``/``bias_bits`` override this layer's own for another call of a shared weight."""
        read = read or self._buffers.__getitem__  # (not getattr: nn.Module.__getattr__ costs ~1 us per read)
        bias = self._own("bias", read) if bias is _OWN else bias
        act = self.act if act is _OWN else act
        act_multiplier = self._own("act_multiplier", read) if act_multiplier is _OWN else act_multiplier
        bias_codes = self._own("bias_codes", read) if bias_codes is _OWN else bias_codes
        act_bits = self.act_bits if act_bits is _OWN else act_bits
        bias_bits = self.bias_bits if bias_bits is _OWN else bias_bits
        head = (x, read(self.format.buffer), read("weight_scale"), bias)
        op, args = self._op_and_args(head, act)
        # the multiplier and the integer bias codes go by keyword; the positional slot before the multiplier
        # (``act_scale``) is its old name, kept for programs exported by earlier versions (ops/_schema.py)
        if act_multiplier is None and bias_codes is None and act_bits == 8 and not bias_bits:
            return op, args, _NO_KWARGS
        kwargs = {"act_multiplier": act_multiplier}
        if bias_codes is not None:
            kwargs["bias_codes"] = bias_codes
        if act_bits != 8:  # schema version 4: only where needed, so other graphs read as before
            kwargs["act_bits"] = act_bits
        if bias_bits:
            kwargs["bias_bits"] = bias_bits
        return op, args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op, args, kwargs = self.op_call(x)
        return op(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        upgrade_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self):
        return {"format_version": FORMAT_VERSION, "weight_format": self.weight_format,
                "weight_shape": list(self.weight_shape), "act": self.act, "act_bits": self.act_bits,
                "bias_bits": self.bias_bits}

    def set_extra_state(self, state):
        if state.get("format_version") != FORMAT_VERSION:
            raise ConvertError(f"layer {self.name!r}: packed format version {state.get('format_version')} does not match "
                               f"this bitlab_fx (version {FORMAT_VERSION}); re-convert the model with this version")
        if list(state.get("weight_shape", [])) != list(self.weight_shape) or state.get("weight_format") != self.weight_format:
            raise ConvertError(f"layer {self.name!r}: saved weight {state.get('weight_format')} {state.get('weight_shape')} "
                               f"does not match this layer ({self.weight_format} {list(self.weight_shape)}); load a "
                               "state_dict converted from the same model with the same qconfig")
        saved_bits = (state.get("act_bits", 8), state.get("bias_bits", 0))  # files before schema version 4: 8, 0
        if saved_bits != (self.act_bits, self.bias_bits):
            raise ConvertError(f"layer {self.name!r}: the state_dict was converted with act_bits, bias_bits = "
                               f"{saved_bits}, this layer uses {(self.act_bits, self.bias_bits)} (input quantizer bits, "
                               "per-token IntBias); load a state_dict converted with the same qconfig")
        if "act" in state and state["act"] != self.act:
            raise ConvertError(f"layer {self.name!r}: the state_dict was converted with activation quantization "
                               f"{state['act']!r}, this layer uses {self.act!r}; load a state_dict converted with the "
                               "same qconfig (activation granularity and dynamic/static included)")

    def _act_repr(self) -> str:
        return self.act if self.act_bits == 8 else f"{self.act} int{self.act_bits}"

    def _apply(self, fn, recurse=True):
        scales = [k for k in self._buffers if k == "weight_scale" or k.startswith("act_multiplier")]
        return apply_keeping_dtype(self, fn, recurse, scales)

    def packed_bytes(self) -> int:
        """Bytes of the stored weight, scales, bias (or integer bias codes) and static activation scale."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))


class QuantizedLinear(_QuantizedBase):
    """A converted linear layer: ``y = bitlab.ternary_linear(x, packed_weight, weight_scale, bias)``."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], spec, act: str = "per_token",
                 act_multiplier: Optional[torch.Tensor] = None, name: str = "", rule: str = "",
                 weight_scale: Optional[torch.Tensor] = None, bias_codes: Optional[torch.Tensor] = None):
        super().__init__()
        self._init_common(spec, act, act_multiplier, name, rule)
        self.out_features, self.in_features = weight.shape
        self.weight_shape: Tuple[int, ...] = tuple(weight.shape)
        self._store_weight(weight.detach(), weight_scale)
        self._store_bias(bias, bias_codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if direct_cpu.eligible(x):  # eager CPU inference: the op's CPU kernel without the dispatcher round trip
            b = self._buffers  # not nn.Module.__getattr__: ~1 us per read
            y = direct_cpu.linear(self.weight_format, x, b[self.format.buffer], b["weight_scale"], b["bias"],
                                  self.act, b["act_multiplier"], self.in_features, b.get("bias_codes"), self.act_bits,
                                  self.bias_bits)
            if y is not None:
                return y
        return super().forward(x)

    def _op_and_args(self, head: tuple, act: str):
        tail = (None, self.in_features) if self.format.packed else (None,)
        return self.format.op("linear"), head + (act,) + tail

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias_kind}, "
                f"weight={self.weight_format}({self.spec.granularity}), act={self._act_repr()}")


class QuantizedConv2d(_QuantizedBase):
    """A converted conv2d layer (``bitlab.ternary_conv2d`` / ``bitlab.int8_conv2d``)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], spec, stride, padding, dilation, groups,
                 act: str = "per_token", act_multiplier: Optional[torch.Tensor] = None, name: str = "", rule: str = "",
                 weight_scale: Optional[torch.Tensor] = None, bias_codes: Optional[torch.Tensor] = None):
        super().__init__()
        self._init_common(spec, act, act_multiplier, name, rule)
        self.weight_shape = tuple(weight.shape)
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * groups
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups
        self._store_weight(weight.detach(), weight_scale)
        self._store_bias(bias, bias_codes)

    def _geometry(self) -> tuple:
        """Arguments after (x, weight, weight_scale, bias) and before the activation mode."""
        geometry = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        return ((list(self.weight_shape),) if self.format.packed else ()) + geometry  # packed: the unpacked shape

    def _op_and_args(self, head: tuple, act: str):
        return self.format.op("conv2d"), head + self._geometry() + (act,)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.weight_shape[2:])}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, groups={self.groups}, "
                f"weight={self.weight_format}({self.spec.granularity}), act={self._act_repr()}, bias={self.bias_kind}")


def conv2d_op(weight_format: str):
    """The ``torch.ops.bitlab`` conv2d op of a weight format ("ternary" | "int4" | "int8")."""
    return WEIGHT_FORMATS[weight_format].op("conv2d")


def conv1d_as_conv2d(weight_format: str, x: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A conv1d through the packed conv2d op on a height-1 image: ``[N, C, L] -> [N, C, 1, L]`` (an unbatched
    ``[C, L]`` too), the weight stored as ``[out, in/groups, 1, k]``. What converted conv1d layers call."""
    unbatched = x.dim() == 2
    x4 = (x.unsqueeze(0) if unbatched else x).unsqueeze(2)
    y = conv2d_op(weight_format)(x4, weight, *args, **kwargs).squeeze(2)
    return y.squeeze(0) if unbatched else y


class QuantizedConv1d(QuantizedConv2d):
    """A converted conv1d layer: stored and run as a conv2d of kernel ``(1, k)`` on a height-1 image
    (:func:`conv1d_as_conv2d`), so it shares the conv2d kernels and packed format."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], spec, stride, padding, dilation, groups,
                 act: str = "per_token", act_multiplier: Optional[torch.Tensor] = None, name: str = "", rule: str = "",
                 weight_scale: Optional[torch.Tensor] = None, bias_codes: Optional[torch.Tensor] = None):
        (s,), (p,), (d,) = tuple(stride), tuple(padding), tuple(dilation)
        super().__init__(weight.unsqueeze(2), bias, spec, (1, s), (0, p), (1, d), groups, act, act_multiplier, name, rule,
                         weight_scale, bias_codes)

    def int_weight(self) -> torch.Tensor:
        """The integer weight as int8 ``[out, in/groups, k]``."""
        return super().int_weight().squeeze(2)

    def _op_and_args(self, head: tuple, act: str):
        return conv1d_as_conv2d, (self.weight_format,) + head + self._geometry() + (act,)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({self.weight_shape[3]},), "
                f"stride=({self.stride[1]},), padding=({self.padding[1]},), groups={self.groups}, "
                f"weight={self.weight_format}({self.spec.granularity}), act={self.act}")
