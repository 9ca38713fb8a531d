import io

import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from _helpers import mlp


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and "bitlab" in str(n.target)]


def _qc():
    return (bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(nn.Conv2d, bfx.int8())
            .set_module_name("head", None))


def test_convert_lowers_to_bitlab_ops_and_drops_float_weights(small_net):
    pm = bfx.prepare_qat(small_net, _qc())
    cm = bfx.convert(pm.eval())
    ops = [str(t) for t in _ops(cm)]
    assert ops.count("bitlab.ternary_linear.default") == 2
    assert ops.count("bitlab.int8_conv2d.default") == 2
    assert isinstance(cm.fc1, bfx.QuantizedLinear) and isinstance(cm.conv, bfx.QuantizedConv2d)
    keys = set(cm.state_dict())
    assert "fc1.packed_weight" in keys and "fc1.weight" not in keys and "w" not in keys
    assert "conv.qweight" in keys and "head.weight" in keys  # head excluded: stays float
    assert cm.fc1.packed_weight.dtype == torch.uint8 and cm.conv.qweight.dtype == torch.int8
    floats = [k for k, v in cm.state_dict().items() if torch.is_tensor(v) and v.dtype.is_floating_point and v.dim() >= 2]
    assert floats == ["head.weight"]  # the only float matrix left is the excluded head
    assert "fake_quant" not in cm.code and "_fq" not in cm.code
    assert pm.fc1.weight is not None  # convert copies by default


def test_converted_reproduces_prepared(small_net):
    torch.manual_seed(1)
    pm = bfx.prepare_qat(small_net, _qc())
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    for _ in range(3):  # trained weights, not just initial ones
        x = torch.randn(8, 3, 8, 8)
        pm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    cm = bfx.convert(pm)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        a, b = pm(x), cm(x)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-3


@pytest.mark.parametrize("cfg", [bfx.ternary("per_tensor", "per_tensor"), bfx.ternary(bfx.PerGroup(16)),
                                 bfx.int8(), bfx.weight_only("ternary"), bfx.weight_only("int4"),
                                 bfx.QuantConfig(weight="ternary", input=bfx.IntActivation(8, dynamic=False, granularity="per_tensor")),
                                 bfx.QuantConfig(weight="ternary", input="uint4")])
def test_every_config_converts_faithfully(cfg):
    torch.manual_seed(0)
    model = mlp((32, 64, 16))
    pm = bfx.prepare_qat(model, cfg)
    pm(torch.randn(64, 32).relu())  # observes static ranges
    pm.eval()
    cm = bfx.convert(pm)
    x = torch.randn(10, 32).relu()
    a, b = pm(x).detach(), cm(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_converted_output_in_input_dtype(dtype):
    pm = bfx.prepare_qat(mlp(), bfx.ternary())
    cm = bfx.convert(pm.eval()).to(dtype)
    y = cm(torch.randn(3, 32, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_converted_state_dict_at_least_10x_smaller_for_512_wide_mlp():
    model = mlp((512, 512, 512, 512))
    cm = bfx.convert(bfx.prepare_qat(model, bfx.ternary()).eval())

    def size(m):
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        return buf.tell()

    assert size(model) / size(cm) >= 10
    t = bfx.summary(cm).totals
    assert t["bytes_fp32"] / t["bytes_quant"] >= 10


def test_converted_state_dict_round_trip_and_version_check():
    pm = bfx.prepare_qat(mlp(), bfx.ternary())
    cm = bfx.convert(pm.eval())
    cm2 = bfx.convert(bfx.prepare_qat(mlp(), bfx.ternary()).eval())
    cm2.load_state_dict(cm.state_dict())
    x = torch.randn(4, 32)
    assert torch.equal(cm(x), cm2(x))
    sd = cm.state_dict()
    sd["0._extra_state"] = dict(sd["0._extra_state"], format_version=99)
    with pytest.raises(bfx.ConvertError, match="format version 99"):
        cm2.load_state_dict(sd)


def test_convert_inplace_and_torch_compile_free_eval():
    pm = bfx.prepare_qat(mlp(), bfx.ternary()).eval()
    cm = bfx.convert(pm, inplace=True)
    assert cm is pm
    assert isinstance(cm.get_submodule("0"), bfx.QuantizedLinear)


def test_quantized_linear_eager_forward_matches_graph():
    pm = bfx.prepare_qat(mlp(), bfx.ternary()).eval()
    cm = bfx.convert(pm)
    x = torch.randn(5, 32)
    h = torch.relu(cm.get_submodule("0")(x))
    torch.testing.assert_close(cm.get_submodule("2")(h), cm(x))


def test_casting_converted_model_keeps_fp32_scales():
    cm = bfx.convert(bfx.prepare_qat(mlp(), bfx.ternary()).eval())
    x = torch.randn(3, 32)
    ref = cm(x)
    cm16 = cm.to(torch.bfloat16)
    layer = cm16.get_submodule("0")
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert layer.packed_weight.dtype == torch.uint8
    y = cm16(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


def test_prepared_model_is_unchanged_by_convert():
    pm = bfx.prepare_qat(mlp(), bfx.ternary()).eval()
    before = str(bfx.summary(pm))
    x = torch.randn(3, 32)
    y = pm(x)
    bfx.convert(pm)
    assert str(bfx.summary(pm)) == before
    assert torch.equal(pm(x), y)
    bfx.convert(pm)  # and it converts again


class _TiedAutoencoder(nn.Module):  # the decoder reads the quantized encoder's weight, transposed
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(32, 16)

    def forward(self, x):
        return nn.functional.linear(torch.relu(self.enc(x)), self.enc.weight.t())


class _LayerAndFunctionalCall(nn.Module):  # the same weight as a module call and as F.linear without bias
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return nn.functional.linear(torch.relu(self.fc(x)), self.fc.weight)


def test_convert_keeps_float_weight_read_outside_the_layer_with_a_warning(tmp_path):
    torch.manual_seed(0)
    pm = bfx.prepare_qat(_TiedAutoencoder(), bfx.ternary()).eval()
    with pytest.warns(UserWarning, match=r"layer 'enc' is quantized, but its float weight is kept .*'t'.*set_module_name"):
        cm = bfx.convert(pm)
    assert isinstance(cm.enc, bfx.QuantizedLinear)
    torch.testing.assert_close(cm.enc.weight, pm.enc.weight.detach())  # the other reader's float weight
    x = torch.randn(4, 32)
    torch.testing.assert_close(cm(x), pm(x).detach(), atol=1e-5, rtol=1e-4)
    path = str(tmp_path / "ae.safetensors")
    bfx.save_quantized(cm, path)
    with pytest.warns(UserWarning, match="float weight is kept"):
        loaded = bfx.load_quantized(_TiedAutoencoder(), path)
    assert torch.equal(loaded(x), cm(x))


def test_convert_weight_shared_by_layer_and_functional_call():
    torch.manual_seed(0)
    pm = bfx.prepare_qat(_LayerAndFunctionalCall(), bfx.ternary()).eval()
    cm = bfx.convert(pm)
    assert isinstance(cm.fc, bfx.QuantizedLinear) and not hasattr(cm.fc, "weight")
    x = torch.randn(4, 16)
    torch.testing.assert_close(cm(x), pm(x).detach(), atol=1e-5, rtol=1e-4)  # the F.linear call has no bias


def test_convert_keeps_float_bias_read_elsewhere_under_int_bias():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x) + self.fc.bias

    cfg = bfx.QuantConfig(weight="int8", input=bfx.IntActivation(8, dynamic=False, granularity="per_tensor"),
                          bias=bfx.IntBias(16))
    torch.manual_seed(0)
    pm = bfx.prepare_qat(M(), cfg)
    x = torch.randn(4, 16)
    pm(x)
    pm.eval()
    with pytest.warns(UserWarning, match="float bias is kept"):
        cm = bfx.convert(pm)
    torch.testing.assert_close(cm.fc.bias_float, pm.fc.bias.detach())
    torch.testing.assert_close(cm(x), pm(x).detach(), atol=1e-5, rtol=1e-4)


def test_convert_warns_when_fake_quant_is_disabled_or_mid_warmup():
    import warnings
    pm = bfx.prepare_qat(mlp(), bfx.ternary())
    bfx.disable_fake_quant(pm)
    with pytest.warns(UserWarning, match=r"4 of 4 fake quantizers are disabled \(layers '0', '2'.*fully quantized.*differ"):
        bfx.convert(pm.eval())
    bfx.enable_fake_quant(pm)
    warm = bfx.QuantWarmup(pm, ramp_steps=4)
    warm.step()
    with pytest.warns(UserWarning, match=r"4 of 4 fake quantizers are mid warm-up \(mix 0.25 < 1.*QuantWarmup"):
        bfx.convert(pm.eval())
    for _ in range(3):
        warm.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bfx.convert(pm.eval())  # fully enabled: silent
