"""The small conv + linear network of the tests (conftest's ``small_net`` fixture and the distributed workers).

A module with a unique name rather than conftest: the spawned distributed workers import test files by
name, and "conftest" is ambiguous there."""
import torch
import torch.nn.functional as F
from torch import nn


class SmallNet(nn.Module):
    """Conv + depthwise conv + linear + functional linear + an excludable head: every layer kind prepare_qat supports."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_dw = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4)
        self.fc1 = nn.Linear(8 * 4 * 4, 64)
        self.w = nn.Parameter(torch.randn(64, 64) / 8)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = F.relu(self.conv_dw(x))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(F.linear(x, self.w))
        return self.head(x)
