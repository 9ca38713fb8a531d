import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bitlab_fx as bfx
from bitlab_fx.quant import exact_layers
from bitlab_fx.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant
from _helpers import TiedLinear, mlp


def _fq_nodes(gm):
    return {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (WeightFakeQuant, ActivationFakeQuant))}


def test_prepare_returns_graph_module_with_explicit_fake_quant_nodes(small_net):
    pm = bfx.prepare_qat(small_net, bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("head", None))
    assert isinstance(pm, fx.GraphModule)
    fq = _fq_nodes(pm)
    for layer in ["conv", "conv_dw", "fc1", "w"]:
        assert fq[f"{layer}_weight_fq"] is WeightFakeQuant
        assert fq[f"{layer}_input_fq"] is ActivationFakeQuant
    assert not any(k.startswith("head") for k in fq)
    # layers are functional calls reading get_attr parameters, fed by the fake quant nodes; a layer with int8
    # input codes is the F.linear call of exact_layers, whose value is computed from the codes like the converted op
    lin = [n for n in pm.graph.nodes if n.target is exact_layers.linear]
    fc1 = next(n for n in lin if n.meta["bitlab"].fqn == "fc1")
    assert fc1.args[0].target == "fc1_input_fq" and fc1.args[1].target == "fc1_weight_fq"
    assert fc1.args[1].args[0].op == "get_attr" and fc1.args[1].args[0].target == "fc1.weight"
    assert fc1.kwargs["codes_from"] is fc1.args[0].args[0] and fc1.kwargs["weight"] is fc1.args[1].args[0]
    assert fc1.kwargs["input_quantizer"].target == "fc1_input_fq" and not fc1.kwargs["on_grid"]
    assert "fc1_input_fq" in pm.code


def test_input_model_untouched_and_state_dict_compatible(small_net):
    before = copy.deepcopy(small_net.state_dict())
    pm = bfx.prepare_qat(small_net, bfx.ternary())
    assert all(torch.equal(before[k], v) for k, v in small_net.state_dict().items())
    assert not any(isinstance(m, WeightFakeQuant) for m in small_net.modules())
    assert set(pm.state_dict()) == set(small_net.state_dict())
    pm.load_state_dict(small_net.state_dict(), strict=True)


def test_fake_quant_disabled_gives_float_model(small_net):
    x = torch.randn(2, 3, 8, 8)
    pm = bfx.prepare_qat(small_net, bfx.ternary())
    assert not torch.allclose(pm(x), small_net(x), atol=1e-5)
    bfx.disable_fake_quant(pm)
    torch.testing.assert_close(pm(x), small_net(x))
    bfx.enable_fake_quant(pm)
    assert not torch.allclose(pm(x), small_net(x), atol=1e-5)


@pytest.mark.parametrize("kw", [dict(stride=2), dict(padding=2, dilation=2), dict(groups=4), dict(padding="same"),
                                dict(padding="valid", bias=False), dict(stride=(2, 1), padding=(1, 0))])
def test_conv_geometries_prepare_and_match_float_when_disabled(kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, **kw), nn.ReLU())
    x = torch.randn(2, 8, 9, 9)
    pm = bfx.prepare_qat(model, bfx.int8())
    assert "conv2d" in pm.code
    bfx.disable_fake_quant(pm)
    torch.testing.assert_close(pm(x), model(x))


def test_unsupported_conv_left_float_and_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    pm = bfx.prepare_qat(model, bfx.ternary())
    assert "0" in bfx.summary(pm).skipped and "reflect" in bfx.summary(pm).skipped["0"]


def test_shared_weight_has_one_weight_fake_quant():
    pm = bfx.prepare_qat(TiedLinear(), bfx.ternary())
    fq = _fq_nodes(pm)
    assert sum(t is WeightFakeQuant for t in fq.values()) == 1
    assert sum(t is ActivationFakeQuant for t in fq.values()) == 2


def test_linear_subclass_with_same_forward_is_quantized_and_matched_by_type():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(8, 8))
    pm = bfx.prepare_qat(model, bfx.QConfigMapping().set_object_type(MyLinear, bfx.int8()))
    assert bfx.summary(pm).rows[0]["weight"] == "int8"


def test_output_quant_inserted_after_layer():
    cfg = bfx.QuantConfig(weight="int8", input="int8", output=bfx.IntActivation(4, signed=False))
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), cfg)
    assert "_0_output_fq" in pm.code or "0_output_fq" in pm.code
    y = pm(torch.randn(3, 8))
    assert y.min() >= 0


def test_prepare_keeps_training_mode_and_checks_example_inputs():
    model = mlp().eval()
    pm = bfx.prepare_qat(model, bfx.ternary(), example_inputs=(torch.randn(2, 32),))
    assert not pm.training
    with pytest.raises(bfx.CaptureError, match="example_inputs"):
        bfx.prepare_qat(model, bfx.ternary(), example_inputs=(torch.randn(2, 31),))


def test_functional_conv2d_on_module_parameters_with_kwargs():
    class FConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(6, 2, 3, 3) / 5)
            self.b = nn.Parameter(torch.zeros(6))

        def forward(self, x):
            return F.conv2d(x, self.kernel, bias=self.b, stride=2, padding=1, groups=2)

    torch.manual_seed(0)
    model = FConv()
    x = torch.randn(2, 4, 8, 8)
    pm = bfx.prepare_qat(model, bfx.QConfigMapping().set_object_type(F.conv2d, bfx.int8()))
    row = bfx.summary(pm).rows[0]
    assert row["layer"] == "kernel" and row["type"] == "F.conv2d" and row["weight"] == "int8"
    cm = bfx.convert(pm.eval())
    assert "int8_conv2d" in cm.code and "kernel" not in dict(cm.named_parameters())
    torch.testing.assert_close(cm(x), pm(x), rtol=1e-4, atol=1e-5)
    bfx.disable_fake_quant(pm)
    torch.testing.assert_close(pm(x), model(x))


def _two_blocks():
    return nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 4)))


def test_prepare_rejects_already_prepared_or_converted_submodules():
    from bitlab_fx.nn import BitLinear
    model = _two_blocks()
    model[0] = bfx.prepare_qat(model[0], bfx.ternary())
    model[1] = bfx.prepare_qat(model[1], bfx.ternary())
    with pytest.raises(bfx.ConfigError, match=r"submodule '0' .*already prepared.*twice.*from the float model.*convert each"):
        bfx.prepare_qat(model, bfx.ternary())
    model(torch.randn(2, 8))  # the per-block flow itself keeps working
    model[0] = bfx.convert(model[0].eval())
    with pytest.raises(bfx.ConfigError, match=r"submodule '0' .*already converted.*from the float model"):
        bfx.prepare_qat(model, bfx.ternary())
    with pytest.raises(bfx.ConfigError, match=r"submodule '0' is an eager BitLinear.*nn.Linear"):
        bfx.prepare_qat(nn.Sequential(BitLinear(8, 8), nn.ReLU()), bfx.ternary())
    with pytest.raises(bfx.ConfigError, match=r"the model .*already converted"):
        bfx.prepare_qat(bfx.QuantizedLinear(torch.randn(4, 8), None, bfx.ternary().weight), bfx.ternary())
