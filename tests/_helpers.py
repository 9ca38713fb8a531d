"""Small models shared by the tests (imported by name, never from conftest: ``from _helpers import mlp``)."""
import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx
from _small_net import SmallNet  # noqa: F401  (re-exported: the conv + linear net of the tests)

# The activation quantizers the exactness tests run every layer through (the prepared forward computed from
# integer codes, and the integer training forward): dynamic per token / per tensor, observed static, learned.
ACTIVATION_SPECS = {
    "per_token": bfx.IntActivation(),
    "per_tensor": bfx.IntActivation(granularity="per_tensor"),
    "observed": bfx.IntActivation(dynamic=False, granularity="per_tensor"),
    "learned": bfx.IntActivation(dynamic=False, granularity="per_tensor", learned=True),
}


def mlp(sizes=(32, 64, 10)):
    """``Linear -> ReLU -> ... -> Linear`` through ``sizes``."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """The LeNet-5 of the Brevitas tutorial, plain torch.nn."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 6, 5), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(6, 16, 5), nn.ReLU()
        self.fc1, self.relu3 = nn.Linear(400, 120), nn.ReLU()
        self.fc2, self.relu4 = nn.Linear(120, 84), nn.ReLU()
        self.fc3 = nn.Linear(84, 10, bias=False)

    def forward(self, x):
        out = F.max_pool2d(self.relu1(self.conv1(x)), 2)
        out = F.max_pool2d(self.relu2(self.conv2(out)), 2)
        out = out.reshape(out.shape[0], -1)
        return self.fc3(self.relu4(self.fc2(self.relu3(self.fc1(out)))))


class TiedLinear(nn.Module):
    """One ``nn.Linear`` called twice (a shared weight): ``fc(relu(fc(x)))``."""

    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))
