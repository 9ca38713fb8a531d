"""``BitMLP``: a stack of :class:`~bitlab_fx.nn.BitLinear` layers, configured by :class:`BitMLPConfig`."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from .bitlinear import BitLinear
from .config import BitQuantConfig


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"BitMLPConfig({name}={value!r}): must be a positive int")


@dataclass(frozen=True)
class BitMLPConfig:
    """``n_layers`` BitLinear layers ``in_channels -> hidden_dim -> ... -> out_channels`` with ReLU and
    dropout between them (``n_layers=1``: a single ``in_channels -> out_channels`` layer)."""

    n_layers: int = 3
    in_channels: int = 784
    hidden_dim: int = 256
    out_channels: int = 10
    dropout: float = 0.0
    quant_config: BitQuantConfig = field(default_factory=BitQuantConfig)

    def __post_init__(self):
        for name in ("n_layers", "in_channels", "hidden_dim", "out_channels"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"BitMLPConfig(dropout={self.dropout!r}): must be a probability in [0, 1)")
        if not isinstance(self.quant_config, BitQuantConfig):
            raise ConfigError(f"BitMLPConfig(quant_config={type(self.quant_config).__name__}): pass a bitlab_fx.BitQuantConfig")


class BitMLP(nn.Module):
    """The model :class:`BitMLPConfig` describes; ``.config`` keeps the config."""

    def __init__(self, config: BitMLPConfig):
        super().__init__()
        self.config = config
        dims = [config.in_channels] + [config.hidden_dim] * (config.n_layers - 1) + [config.out_channels]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(BitLinear(a, b, bias=True, quant_config=config.quant_config))
            if i < len(dims) - 2:
                layers += [nn.ReLU(), nn.Dropout(config.dropout)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)

    def bit_layers(self):
        return [m for m in self.modules() if isinstance(m, BitLinear)]

    def deploy(self) -> "BitMLP":
        """Deploy every BitLinear (packed 2-bit weights, float weights dropped); inference only."""
        for m in self.bit_layers():
            m.deploy()
        return self.eval()

    def packed_bytes(self) -> int:
        """Bytes the deployed model stores for its layers (packed weights, scales, biases)."""
        return sum(m.packed_bytes() for m in self.bit_layers())
