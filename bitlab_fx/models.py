"""BitLab-style pre-built models: ``AutoBitModel.from_config(BitMLPConfig(...))`` (defined in :mod:`bitlab_fx.bitlab`)."""
from .bitlab import AutoBitModel, BitMLP, BitMLPConfig

__all__ = ["AutoBitModel", "BitMLP", "BitMLPConfig"]
