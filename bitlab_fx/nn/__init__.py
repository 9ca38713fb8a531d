"""Eager layers: the converted-layer containers (and the seed-style drop-in layers)."""
from .quantized import QuantizedConv2d, QuantizedLinear

__all__ = ["QuantizedLinear", "QuantizedConv2d"]
