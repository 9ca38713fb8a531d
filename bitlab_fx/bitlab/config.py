"""``BitQuantConfig``: the BitLab-style config, a thin front for :class:`~bitlab_fx.config.QuantConfig`.

BitLab users write ``BitQuantConfig(activation_dtype=..., activation_granularity=..., weight_granularity=...)``;
it means ternary absmean weights and (optionally) int8 absmax activations. :meth:`BitQuantConfig.to_quant_config`
gives the equivalent ``QuantConfig``, so the same object works for the eager ``BitLinear`` and as the
``qconfig`` of ``prepare_qat`` (both routes then compute the same numbers).

``activation_granularity="per_channel"`` (used by the BitLab tutorial) is read as ``"per_token"``: one
scale per row of the input, the finest activation granularity an integer matmul can factor out of
its dot products (a scale per input *feature* cannot be). The original value is kept on the object.

>>> from bitlab_fx import BitQuantConfig
>>> BitQuantConfig(weight_granularity="per_channel").to_quant_config().describe()
'W1.58(per_channel) A8(per_tensor)'
>>> BitQuantConfig(activation_dtype="float32").to_quant_config().describe()
'W1.58(per_tensor)'
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import IntActivation, QuantConfig, TernaryWeight
from ..errors import ConfigError

ACTIVATION_DTYPES = ("int8", "float32")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token", "per_channel")
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
_ACT_ALIASES = {"per_channel": "per_token"}  # see the module docstring


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"BitQuantConfig({name}={value!r}): use one of {', '.join(repr(a) for a in allowed)}")


@dataclass(frozen=True)
class BitQuantConfig:
    """Ternary (1.58-bit) absmean weights; int8 absmax activations or float ones.

    - ``activation_dtype``: ``"int8"`` (quantize each layer's input) or ``"float32"`` (leave it float).
    - ``activation_granularity``: ``"per_tensor"``, ``"per_token"`` (one scale per row) or
      ``"per_channel"`` (BitLab's name, treated as ``"per_token"``).
    - ``weight_granularity``: ``"per_tensor"`` or ``"per_channel"`` (one scale per output feature).
    """

    activation_dtype: str = "int8"
    activation_granularity: str = "per_tensor"
    weight_granularity: str = "per_tensor"

    def __post_init__(self):
        _check_choice("activation_dtype", self.activation_dtype, ACTIVATION_DTYPES)
        _check_choice("activation_granularity", self.activation_granularity, ACTIVATION_GRANULARITIES)
        _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)

    @property
    def weight_spec(self) -> TernaryWeight:
        return TernaryWeight(granularity=self.weight_granularity, scale="absmean")

    @property
    def activation_spec(self):
        """The :class:`IntActivation` of the layer inputs, or None for float activations."""
        if self.activation_dtype == "float32":
            return None
        g = _ACT_ALIASES.get(self.activation_granularity, self.activation_granularity)
        return IntActivation(bits=8, signed=True, granularity=g, dynamic=True)

    def to_quant_config(self) -> QuantConfig:
        """The equivalent :class:`QuantConfig` (what ``prepare_qat`` uses when given this object)."""
        return QuantConfig(weight=self.weight_spec, input=self.activation_spec)
