"""Quantization configs: frozen dataclasses, validated when built.

A :class:`QuantConfig` says how one layer is quantized: its weight (:class:`TernaryWeight` or
:class:`IntWeight`), its input activation and optionally its output and bias. Strings are accepted
as shorthands wherever a spec is expected, so ``QuantConfig(weight="ternary", input="int8")`` works.

>>> import bitlab_fx as bfx
>>> bfx.ternary()
QuantConfig(weight=TernaryWeight(granularity='per_channel', scale='absmean'), input=IntActivation(bits=8, signed=True, granularity='per_token', dynamic=True, learned=False), output=None, bias=None, train_kernel='fake_quant')
>>> bfx.QuantConfig(weight="int4", input="int8").weight
IntWeight(bits=4, granularity='per_channel', scale='absmax')
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from .errors import ConfigError

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")
WEIGHT_SCALES = ("absmean", "absmax", "learned")  # TernaryWeight
INT_WEIGHT_SCALES = ("absmax", "learned")  # IntWeight
TRAIN_KERNELS = ("fake_quant", "int8")  # QuantConfig.train_kernel: how a prepared layer computes its training forward


@dataclass(frozen=True)
class PerGroup:
    """One scale per group of ``size`` consecutive input columns of each output channel."""

    size: int

    def __post_init__(self):
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise ConfigError(f"PerGroup(size={self.size!r}): the group size must be a positive int, e.g. PerGroup(128)")

    def __str__(self) -> str:
        return f"per_group:{self.size}"


Granularity = Union[str, PerGroup]


def parse_granularity(value: Any, allowed: tuple, what: str) -> Granularity:
    """Turn ``"per_channel"``, ``"per_group:64"`` or ``PerGroup(64)`` into a canonical granularity."""
    if isinstance(value, PerGroup):
        if "per_group" not in allowed:
            raise ConfigError(f"{what}: PerGroup is not supported here; use one of {', '.join(allowed)}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"per_group[:(](\d+)\)?", value)
        if m and "per_group" in allowed:
            return PerGroup(int(m.group(1)))
        if value in allowed and value != "per_group":
            return value
    names = [a if a != "per_group" else "PerGroup(n)" for a in allowed]
    raise ConfigError(f"{what}: unknown granularity {value!r}; use one of {', '.join(names)}")


@dataclass(frozen=True)
class TernaryWeight:
    """Ternary weights {-1, 0, +1} times a scale (BitNet b1.58).

    ``scale="absmean"`` (default): ``g = mean(|W|)`` over the group, ``Wq = clamp(round(W/g), -1, 1)``.
    ``scale="absmax"``: ``g = max(|W|)``, a coarser alternative that zeroes more weights.
    ``scale="learned"``: ``g`` is a trainable parameter (LSQ, Esser et al. 2020), initialised from absmean
    and trained with the LSQ gradient; the prepared model then holds a ``<layer>_weight_fq.scale`` parameter.
    """

    granularity: Granularity = "per_channel"
    scale: str = "absmean"

    def __post_init__(self):
        g = parse_granularity(self.granularity, WEIGHT_GRANULARITIES + ("per_group",), "TernaryWeight")
        object.__setattr__(self, "granularity", g)
        if self.scale not in WEIGHT_SCALES:
            raise ConfigError(f"TernaryWeight(scale={self.scale!r}): use one of {', '.join(WEIGHT_SCALES)}")

    @property
    def learned(self) -> bool:
        return self.scale == "learned"

    @property
    def bits(self) -> float:
        return 1.58

    @property
    def format(self) -> str:
        return "ternary"


@dataclass(frozen=True)
class IntWeight:
    """Symmetric signed integer weights of 2..8 bits: ``Wq = clamp(round(W/g), -q, q)``, ``q = 2**(bits-1)-1``,
    ``g = max(|W|)/q`` over the group (``scale="absmax"``, default), or a trainable ``g`` initialised
    from it (``scale="learned"``, LSQ)."""

    bits: int = 8
    granularity: Granularity = "per_channel"
    scale: str = "absmax"

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ConfigError(f"IntWeight(bits={self.bits!r}): weight bits must be an int from 2 to 8 (use TernaryWeight() for 1.58 bits)")
        g = parse_granularity(self.granularity, WEIGHT_GRANULARITIES + ("per_group",), f"IntWeight(bits={self.bits})")
        object.__setattr__(self, "granularity", g)
        if self.scale not in INT_WEIGHT_SCALES:
            raise ConfigError(f"IntWeight(bits={self.bits}, scale={self.scale!r}): use one of {', '.join(INT_WEIGHT_SCALES)}")

    @property
    def learned(self) -> bool:
        return self.scale == "learned"

    @property
    def format(self) -> str:
        return f"int{self.bits}"


@dataclass(frozen=True)
class IntActivation:
    """Integer activations. Signed: ``s = (2**(bits-1)-1) / max(|x|)``, ``xq = clamp(round(x*s), -2**(bits-1), 2**(bits-1)-1)``.
    Unsigned (post-ReLU): ``s = (2**bits-1) / max(x)``, ``xq = clamp(round(x*s), 0, 2**bits-1)``.

    ``dynamic=True`` computes ``max`` from each input (per token or per tensor); ``dynamic=False`` keeps a
    static scale: observed as a running max during training, then fixed for inference.
    ``learned=True`` (static only) makes that step a trainable parameter (LSQ): initialised from the range
    observed on the first training batches, then trained with the LSQ gradient
    (``IntActivation(8, dynamic=False, granularity="per_tensor", learned=True)``).
    """

    bits: int = 8
    signed: bool = True
    granularity: str = "per_token"
    dynamic: bool = True
    learned: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ConfigError(f"IntActivation(bits={self.bits!r}): activation bits must be an int from 2 to 8")
        for name in ("signed", "dynamic", "learned"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"IntActivation({name}={getattr(self, name)!r}): {name} must be True or False")
        g = parse_granularity(self.granularity, ACTIVATION_GRANULARITIES, f"IntActivation(bits={self.bits})")
        object.__setattr__(self, "granularity", g)
        if not self.dynamic and g != "per_tensor":
            raise ConfigError(
                f"IntActivation(dynamic=False, granularity={g!r}): a static scale is one number per tensor; "
                "use granularity='per_tensor' with dynamic=False")
        if self.learned and self.dynamic:
            raise ConfigError(
                f"IntActivation(bits={self.bits}, learned=True, dynamic=True): a learned scale is a static scale "
                "(one trained number per tensor); use IntActivation(bits, dynamic=False, granularity='per_tensor', learned=True)")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def format(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


@dataclass(frozen=True)
class IntBias:
    """Signed integer bias of ``bits`` bits on the step ``input_step * weight_step`` (Brevitas' Int8Bias).

    The input step is that of the quantizer that feeds the layer: its own ``input=``, or an upstream output
    quantizer (a quantized ReLU) whose values reach the layer through scale-preserving ops (max-pool, flatten, ...).
    A static quantizer gives one step per channel: ``convert`` stores the bias as int32 codes that the kernels add
    to the integer accumulator. A dynamic one gives one step per token (a conv's token is a sample): the codes are
    made per token when the layer runs, and ``convert`` keeps the float bias for that."""

    bits: int = 8

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 32:
            raise ConfigError(f"IntBias(bits={self.bits!r}): bias bits must be an int from 2 to 32")


def _weight_spec(value: Any) -> Optional[Union[TernaryWeight, IntWeight]]:
    if value is None or isinstance(value, (TernaryWeight, IntWeight)):
        return value
    if isinstance(value, str):
        if value in ("ternary", "1.58bit", "int1.58"):
            return TernaryWeight()
        m = re.fullmatch(r"int(\d)", value)
        if m:
            return IntWeight(bits=int(m.group(1)))
    raise ConfigError(f"weight={value!r}: use TernaryWeight(...), IntWeight(bits=...), 'ternary' or 'int2'..'int8'")


def _activation_spec(value: Any) -> Optional[IntActivation]:
    if value is None or isinstance(value, IntActivation):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"(u?)int(\d)", value)
        if m:
            return IntActivation(bits=int(m.group(2)), signed=not m.group(1))
        if value in ("float", "float32", "none"):
            return None
    raise ConfigError(f"activation={value!r}: use IntActivation(...), 'int8', 'uint4', ... or None to keep it float")


def _bias_spec(value: Any) -> Optional[IntBias]:
    if value is None or isinstance(value, IntBias):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"int(\d+)", value)
        if m:
            return IntBias(bits=int(m.group(1)))
    raise ConfigError(f"bias={value!r}: use IntBias(bits=...), 'int8', ... or None to keep it float")


@dataclass(frozen=True)
class QuantConfig:
    """How one layer is quantized. ``None`` in a field keeps that tensor in float.

    - ``weight``: :class:`TernaryWeight` or :class:`IntWeight` (layers with weights only).
    - ``input``: :class:`IntActivation` applied to the layer's input.
    - ``output``: :class:`IntActivation` applied to the output of any module or function.
    - ``bias``: :class:`IntBias`.
    - ``train_kernel``: ``"fake_quant"`` (default) or ``"int8"``: the prepared layer's forward runs as an integer
      matmul on int8 activation codes and saves those codes (not the float input) for the backward
      (``quant/integer_train.py``); same values and gradients. Layers without int8 input codes keep fake quant.
    """

    weight: Optional[Union[TernaryWeight, IntWeight]] = None
    input: Optional[IntActivation] = None
    output: Optional[IntActivation] = None
    bias: Optional[IntBias] = None
    train_kernel: str = "fake_quant"

    def __post_init__(self):
        object.__setattr__(self, "weight", _weight_spec(self.weight))
        object.__setattr__(self, "input", _activation_spec(self.input))
        object.__setattr__(self, "output", _activation_spec(self.output))
        object.__setattr__(self, "bias", _bias_spec(self.bias))
        if self.train_kernel not in TRAIN_KERNELS:
            raise ConfigError(f"QuantConfig(train_kernel={self.train_kernel!r}): use one of {', '.join(TRAIN_KERNELS)}")
        if self.bias is not None and self.weight is None:
            raise ConfigError("QuantConfig(bias=IntBias(...)) needs a quantized weight: the bias step is "
                              "input_step * weight_step; add weight=IntWeight(...) or TernaryWeight(...)")
        # the input step may come from the layer's own input= or from an upstream output quantizer: checked at
        # prepare time, when the graph says which quantizer reaches the layer (passes/input_scale.py)

    def to_dict(self) -> dict:
        """A JSON-friendly dict; :meth:`from_dict` reads it back."""
        out = {}
        for f in dataclasses.fields(self):
            spec = getattr(self, f.name)
            if spec is None or isinstance(spec, str):  # a field left float, or train_kernel
                out[f.name] = spec
                continue
            d = {"type": type(spec).__name__}
            for sf in dataclasses.fields(spec):
                v = getattr(spec, sf.name)
                d[sf.name] = str(v) if isinstance(v, PerGroup) else v
            out[f.name] = d
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"QuantConfig.from_dict expects a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"QuantConfig.from_dict: unknown field(s) {sorted(unknown)}; use weight, input, output, bias, "
                              "train_kernel")
        kinds = {"TernaryWeight": TernaryWeight, "IntWeight": IntWeight, "IntActivation": IntActivation, "IntBias": IntBias}
        kwargs = {}
        for name, spec in d.items():
            if spec is None or isinstance(spec, str):
                kwargs[name] = spec
                continue
            spec = dict(spec)
            kind = spec.pop("type", None)
            if kind not in kinds:
                raise ConfigError(f"QuantConfig.from_dict: field {name!r} has unknown type {kind!r}; use one of {sorted(kinds)}")
            try:
                kwargs[name] = kinds[kind](**spec)
            except TypeError as e:
                raise ConfigError(f"QuantConfig.from_dict: field {name!r}: {e}") from None
        return cls(**kwargs)

    def describe(self) -> str:
        """A short human label such as ``W1.58(per_channel) A8(per_token)``."""
        parts = []
        if self.weight is not None:
            bits = "1.58" if isinstance(self.weight, TernaryWeight) else str(self.weight.bits)
            parts.append(f"W{bits}({self.weight.granularity}{',learned' if self.weight.learned else ''})")
        if self.input is not None:
            parts.append(f"A{self.input.bits}{'' if self.input.signed else 'u'}({self.input.granularity}{'' if self.input.dynamic else ',static'}{',learned' if self.input.learned else ''})")
        if self.output is not None:
            parts.append(f"O{self.output.bits}{'' if self.output.signed else 'u'}")
        if self.bias is not None:
            parts.append(f"B{self.bias.bits}")
        if self.train_kernel != "fake_quant":
            parts.append(f"train:{self.train_kernel}")
        return " ".join(parts) or "float"


def ternary(weight_granularity: Granularity = "per_channel", activation_granularity: str = "per_token",
            weight_scale: str = "absmean") -> QuantConfig:
    """BitNet b1.58: ternary absmean weights and dynamic int8 absmax activations."""
    return QuantConfig(weight=TernaryWeight(weight_granularity, weight_scale),
                       input=IntActivation(8, True, activation_granularity, True))


def int8(weight_granularity: Granularity = "per_channel", activation_granularity: str = "per_token") -> QuantConfig:
    """int8 symmetric weights and dynamic int8 activations."""
    return QuantConfig(weight=IntWeight(8, weight_granularity), input=IntActivation(8, True, activation_granularity, True))


def weight_only(weight: Union[str, TernaryWeight, IntWeight] = "ternary") -> QuantConfig:
    """Quantize weights only; activations stay float."""
    return QuantConfig(weight=weight)
