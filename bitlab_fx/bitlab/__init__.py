"""The BitLab compatibility layer, in one place: what BitLab's users write, working on bitlab_fx.

- :class:`BitQuantConfig` (``config.py``): BitLab's config, a front for :class:`~bitlab_fx.QuantConfig`;
- :class:`BitLinear` (``bitlinear.py``): the eager drop-in ternary linear layer (train / eval / ``deploy()``);
- :class:`AutoBitModel`, :class:`BitMLP`, :class:`BitMLPConfig` (``auto.py``, ``mlp.py``): pre-built models.

Public paths, as in BitLab's tutorial: ``bitlab_fx.BitQuantConfig``, ``bitlab_fx.nn.BitLinear``,
``bitlab_fx.models.AutoBitModel`` (see docs/migrating-from-bitlab.md).
"""
from .config import BitQuantConfig
from .bitlinear import BitLinear
from .mlp import BitMLP, BitMLPConfig
from .auto import AutoBitModel

__all__ = ["AutoBitModel", "BitLinear", "BitMLP", "BitMLPConfig", "BitQuantConfig"]
