"""BitLab-style pre-built models: ``AutoBitModel.from_config(BitMLPConfig(...))``."""
from .auto import AutoBitModel
from .mlp import BitMLP, BitMLPConfig

__all__ = ["AutoBitModel", "BitMLP", "BitMLPConfig"]
