import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from _helpers import mlp


def test_prepare_twice():
    pm = bfx.prepare_qat(mlp(), bfx.ternary())
    with pytest.raises(bfx.ConfigError, match="already prepared"):
        bfx.prepare_qat(pm, bfx.ternary())


def test_group_size_not_dividing_in_features_names_layer_and_numbers():
    model = nn.Sequential(nn.Linear(48, 8))
    with pytest.raises(bfx.ConfigError, match=r"layer '0'.*group size 32 does not divide in_features=48"):
        bfx.prepare_qat(model, bfx.ternary(bfx.PerGroup(32)))


def test_per_group_on_conv_is_rejected():
    with pytest.raises(bfx.ConfigError, match="linear layers only"):
        bfx.prepare_qat(nn.Sequential(nn.Conv2d(4, 4, 1)), bfx.ternary(bfx.PerGroup(2)))


def test_nan_weights_at_convert_name_the_layer():
    pm = bfx.prepare_qat(mlp(), bfx.ternary())
    with torch.no_grad():
        pm.get_submodule("2").weight[0, 0] = float("nan")
    with pytest.raises(bfx.ConvertError, match=r"layer '2'.*NaN/inf"):
        bfx.convert(pm)


def test_bad_qconfig_types():
    with pytest.raises(bfx.ConfigError):
        bfx.prepare_qat(mlp(), None)
    with pytest.raises(bfx.ConfigError):
        bfx.prepare_qat(mlp(), "ternary")
    with pytest.raises(bfx.ConfigError, match="frontend"):
        bfx.prepare_qat(mlp(), bfx.ternary(), frontend="onnx")
    with pytest.raises(bfx.ConfigError, match="torch.nn.Module"):
        bfx.prepare_qat(lambda x: x, bfx.ternary())
