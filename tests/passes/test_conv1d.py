"""nn.Conv1d / F.conv1d layers: quantized like Conv2d (per output channel, one activation scale per sample),
converted to QuantizedConv1d, which runs the packed conv2d kernels on a height-1 image."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.nn.quantized import QuantizedConv1d


class Net(nn.Module):
    """Conv1d with every geometry argument, a functional conv1d on a parameter, and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(8, 16, 5, padding=2)
        self.c2 = nn.Conv1d(16, 16, 3, stride=2, groups=4, dilation=2, padding="valid")
        self.c3 = nn.Conv1d(16, 16, 3, padding="same", bias=False)
        self.w4 = nn.Parameter(torch.randn(12, 16, 1) * 0.2)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = F.conv1d(self.c3(x), self.w4)
        return self.fc(x.mean(-1))


CONFIGS = {"ternary": bfx.ternary, "int8": bfx.int8,
           "int4": lambda: bfx.QuantConfig(weight=bfx.IntWeight(4), input="int8"),
           "weight-only": lambda: bfx.weight_only("ternary")}


def _trained(config, frontend="fx"):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 40)
    pm = bfx.prepare_qat(Net(), config, frontend=frontend, example_inputs=(x,) if frontend == "export" else None)
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        pm(torch.randn(3, 8, 40)).square().mean().backward()
        opt.step()
    return pm.eval(), x


@pytest.mark.parametrize("name", list(CONFIGS))
def test_conv1d_layers_quantize_train_and_convert_to_the_prepared_outputs(name):
    pm, x = _trained(CONFIGS[name]())
    s = bfx.summary(pm)
    assert s.totals["quantized"] == 5  # c1, c2, c3, the functional w4 conv, fc
    assert {r["type"] for r in s.rows} == {"Conv1d", "F.conv1d", "Linear"}
    cm = bfx.convert(pm)
    assert isinstance(cm.c1, QuantizedConv1d) and tuple(cm.c1.int_weight().shape) == (16, 8, 5)
    assert "conv1d_as_conv2d" in cm.print_readable(print_output=False)
    torch.testing.assert_close(cm(x), pm(x).detach(), rtol=1e-4, atol=1e-5)
    assert bfx.summary(cm).totals["bytes_quant"] < bfx.summary(cm).totals["bytes_fp32"]


def test_converted_layer_matches_eager_conv1d_on_its_integer_weights_and_runs_unbatched():
    torch.manual_seed(1)
    conv = nn.Conv1d(6, 10, 3, stride=2, padding=1)
    pm = bfx.prepare_qat(nn.Sequential(conv), bfx.weight_only("int8")).eval()
    cm = bfx.convert(pm)
    layer = cm.get_submodule("0")
    w = layer.int_weight().float() * layer.weight_scale.reshape(-1, 1, 1)
    x = torch.randn(2, 6, 21)
    expected = F.conv1d(x, w, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cm(x[0]), expected[0], rtol=1e-5, atol=1e-5)  # [C, L] input
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # the container as an eager layer


def test_mapping_rules_by_conv1d_type():
    pm = bfx.prepare_qat(Net(), bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(nn.Conv1d, None))
    rows = {r["layer"]: r for r in bfx.summary(pm).rows}
    assert rows["c1"]["weight"] == "float" and rows["fc"]["weight"] == "ternary"
    pm = bfx.prepare_qat(Net(), bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(nn.Conv1d, bfx.int8()))
    assert {r["layer"]: r["weight"] for r in bfx.summary(pm).rows}["c2"] == "int8"


def test_per_group_weights_on_conv1d_is_a_config_error():
    with pytest.raises(bfx.ConfigError, match=r"layer 'c1' \(Conv1d.*PerGroup weight granularity is supported for "
                                              r"linear layers only"):
        bfx.prepare_qat(Net(), bfx.ternary(weight_granularity=bfx.PerGroup(4)))


def test_circular_padding_is_left_float_with_the_reason():
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(8 * 10, 2))
    pm = bfx.prepare_qat(model, bfx.ternary())
    assert "padding_mode='circular'" in str(bfx.summary(pm))
    x = torch.randn(2, 4, 10)
    torch.testing.assert_close(bfx.convert(pm.eval())(x), pm(x).detach(), rtol=1e-5, atol=1e-5)


def test_export_frontend_quantizes_conv1d_like_fx():
    pm, x = _trained(bfx.ternary(), frontend="export")
    assert bfx.summary(pm).totals["quantized"] == 5
    cm = bfx.convert(pm)
    torch.testing.assert_close(cm(x), pm(x).detach(), rtol=1e-4, atol=1e-5)


def test_conv1d_state_dict_save_quantized_and_compile(tmp_path):
    pm, x = _trained(bfx.ternary())
    cm = bfx.convert(pm)
    path = str(tmp_path / "conv1d.safetensors")
    bfx.save_quantized(cm, path)
    torch.manual_seed(0)
    loaded = bfx.load_quantized(Net(), path)
    assert torch.equal(loaded(x), cm(x))
    other = bfx.convert(bfx.prepare_qat(Net(), bfx.ternary()).eval())
    other.load_state_dict(cm.state_dict())
    assert torch.equal(other(x), cm(x))
    compiled = torch.compile(cm, fullgraph=True)
    torch.testing.assert_close(compiled(x), cm(x), rtol=1e-5, atol=1e-5)


def test_untraceable_parent_quantizes_its_conv1d_as_a_lone_layer():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3, padding=1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace this module
                return self.conv(x)
            return -self.conv(x)

    model = nn.Sequential(Gate(), nn.Flatten(), nn.Linear(4 * 9, 3))
    pm = bfx.prepare_qat(model, bfx.ternary())
    assert {r["layer"] for r in bfx.summary(pm).rows if r["weight"] == "ternary"} >= {"0.conv", "2"}
    x = torch.randn(2, 4, 9)
    torch.testing.assert_close(bfx.convert(pm.eval())(x), pm(x).detach(), rtol=1e-4, atol=1e-5)


def test_unsupported_conv_types_are_listed_and_an_explicit_rule_says_so():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.Unflatten(1, (2, 1)),
                          nn.ConvTranspose1d(2, 2, 3))
    text = str(bfx.summary(bfx.prepare_qat(model, bfx.ternary())))
    assert "left float (unsupported): 0: Conv3d is not supported" in text
    assert "4: ConvTranspose1d is not supported" in text
    with pytest.raises(bfx.ConfigError, match=r"a layer type bitlab_fx cannot quantize \(supported: nn.Linear, "
                                              r"nn.Conv1d, nn.Conv2d"):
        bfx.prepare_qat(model, bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(nn.Conv3d, bfx.int8()))
