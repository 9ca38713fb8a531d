"""``AutoBitModel.from_config(config)``: build the BitLab-style model a config describes."""
from __future__ import annotations

from typing import Dict

from torch import nn

from ..errors import ConfigError
from .mlp import BitMLP, BitMLPConfig


class AutoBitModel:
    """Factory, as in BitLab: ``AutoBitModel.from_config(BitMLPConfig(...))`` returns a ``BitMLP``.

    >>> import torch
    >>> from bitlab_fx.models import AutoBitModel, BitMLPConfig
    >>> model = AutoBitModel.from_config(BitMLPConfig(n_layers=3, in_channels=256, hidden_dim=128, out_channels=10))
    >>> model(torch.randn(2, 256)).shape
    torch.Size([2, 10])
    """

    _registry: Dict[type, type] = {BitMLPConfig: BitMLP}

    def __init__(self):
        raise TypeError("AutoBitModel is a factory: use AutoBitModel.from_config(config)")

    @classmethod
    def register(cls, config_type: type, model_type: type) -> None:
        """Teach the factory a new config -> model pair."""
        cls._registry[config_type] = model_type

    @classmethod
    def from_config(cls, config) -> nn.Module:
        model_type = cls._registry.get(type(config))
        if model_type is None:
            known = ", ".join(t.__name__ for t in cls._registry)
            raise ConfigError(f"AutoBitModel.from_config: no model for a {type(config).__name__}; "
                              f"pass one of: {known} (or AutoBitModel.register(ConfigType, ModelType))")
        return model_type(config)
