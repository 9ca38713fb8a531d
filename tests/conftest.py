import pytest
import torch

from _helpers import SmallNet


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return SmallNet()
