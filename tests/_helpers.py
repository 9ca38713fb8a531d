"""Small models shared by the tests (imported by name, never from conftest: ``from _helpers import mlp``)."""
from torch import nn

from _small_net import SmallNet  # noqa: F401  (re-exported: the conv + linear net of the tests)


def mlp(sizes=(32, 64, 10)):
    """``Linear -> ReLU -> ... -> Linear`` through ``sizes``."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
