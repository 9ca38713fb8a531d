import pytest
import torch
from torch import nn

from _small_net import SmallNet  # noqa: F401  (also imported from here by the test files)


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return SmallNet()


def mlp(sizes=(32, 64, 10)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
