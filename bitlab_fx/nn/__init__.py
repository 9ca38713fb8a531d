"""Eager layers: the converted-layer containers, and BitLab's drop-in ``BitLinear`` (from :mod:`bitlab_fx.bitlab`)."""
from ..bitlab import BitLinear
from .quantized import QuantizedConv1d, QuantizedConv2d, QuantizedLinear

__all__ = ["BitLinear", "QuantizedConv1d", "QuantizedConv2d", "QuantizedLinear"]
