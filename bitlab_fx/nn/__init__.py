"""Eager layers: the converted-layer containers and the seed-style (BitLab) drop-in layers."""
from .quantized import QuantizedConv2d, QuantizedLinear
from .bitlinear import BitLinear

__all__ = ["QuantizedLinear", "QuantizedConv2d", "BitLinear"]
