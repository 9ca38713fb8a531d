"""Eager layers: the converted-layer containers, and BitLab's drop-in ``BitLinear`` (from :mod:`bitlab_fx.bitlab`)."""
from ..bitlab import BitLinear
from .embedding import FakeQuantEmbedding, QuantizedEmbedding
from .quantized import QuantizedConv1d, QuantizedConv2d, QuantizedLinear

__all__ = ["BitLinear", "FakeQuantEmbedding", "QuantizedEmbedding", "QuantizedConv1d", "QuantizedConv2d", "QuantizedLinear"]
