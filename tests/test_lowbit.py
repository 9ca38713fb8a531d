"""Brevitas-style low-bit QAT through the graph passes: intN weights, static unsigned activations after
ReLUs, the model input, IntBias; lowered to packed int4 / int8 ops and fused quantize-dequantize."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx
from _helpers import LeNet, mlp

ACT4 = dict(bits=4, dynamic=False, granularity="per_tensor")


def w3a4_mapping():
    return (bfx.QConfigMapping()
            .set_global(bfx.QuantConfig(weight=bfx.IntWeight(3), input=bfx.IntActivation(signed=True, **ACT4),
                                        bias=bfx.IntBias(8)))
            .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(signed=False, **ACT4))))


def _fq_names(gm, kind):
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ == kind]


def _trained_lenet(steps=3):
    torch.manual_seed(0)
    pm = bfx.prepare_qat(LeNet(), w3a4_mapping())
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        loss = F.cross_entropy(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm.eval()


def test_lenet_mapping_inserts_brevitas_style_quantizers():
    pm = bfx.prepare_qat(LeNet(), w3a4_mapping())
    assert _fq_names(pm, "ActivationFakeQuant") == ["conv1_input_fq", "relu1_output_fq", "relu2_output_fq",
                                                    "relu3_output_fq", "relu4_output_fq"]  # one per ReLU + the model input
    assert _fq_names(pm, "BiasFakeQuant") == ["conv1_bias_fq", "conv2_bias_fq", "fc1_bias_fq", "fc2_bias_fq"]  # fc3 has no bias
    assert pm.relu1_output_fq.spec.qmin == 0 and pm.relu1_output_fq.spec.qmax == 15
    # conv2 reads relu1's 4-bit output through max_pool2d: no second input quantizer
    notes = {n.meta["bitlab"].fqn: n.meta["bitlab"].notes for n in pm.graph.nodes if "bitlab" in n.meta}
    assert any("relu1" in note for note in notes["conv2"])
    # and the summary says where conv2's input is quantized, before and after convert
    for model in (pm, bfx.convert(pm.eval())):
        rows = {r["layer"]: r for r in bfx.summary(model).rows}
        assert rows["conv2"]["activation"] == "uint4 from 'relu1'"
        assert rows["conv1"]["activation"].startswith("int4 per_tensor static")


def test_lenet_converts_to_packed_int4_ops_and_reproduces_prepared():
    pm = _trained_lenet()
    cm = bfx.convert(pm)
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        a, b = pm(x), cm(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-3
    assert torch.equal(a.argmax(1), b.argmax(1))
    ops = [str(n.target) for n in cm.graph.nodes if n.op == "call_function" and "bitlab" in str(n.target)]
    assert ops.count("bitlab.int4_conv2d.default") == 2 and ops.count("bitlab.int4_linear.default") == 3
    assert ops.count("bitlab.quantize_dequantize.default") == 5
    assert "_fq" not in cm.code
    assert tuple(cm.fc1.packed_weight.shape) == (120, 200) and cm.fc1.packed_weight.dtype == torch.uint8
    assert tuple(cm.conv1.packed_weight.shape) == (6, 38)  # K = 3*5*5 = 75 -> 38 bytes
    assert int(cm.fc1.int_weight().abs().max()) <= 3  # 3-bit symmetric: -3..3
    floats = [k for k, v in cm.state_dict().items() if torch.is_tensor(v) and v.dtype.is_floating_point and v.dim() >= 2]
    assert floats == []


def test_int_bias_is_on_the_input_times_weight_step_grid():
    pm = _trained_lenet()
    bfq = pm.fc1_bias_fq
    w = pm.get_parameter("fc1.weight")
    step = bfq.step(w)
    assert step.shape == (120,)
    g = w.detach().abs().amax(1) / 3  # IntWeight(3) per channel; input step = 1 / multiplier of relu2's quantizer
    torch.testing.assert_close(step, g / pm.relu2_output_fq.multiplier(torch.empty(0)))
    codes = bfq(pm.get_parameter("fc1.bias"), w) / step
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert codes.abs().max() <= 128
    cm = bfx.convert(pm)
    assert cm.fc1.bias is None and cm.fc1.bias_codes.dtype == torch.int32  # stored as integer codes with their step
    assert torch.equal(cm.fc1.bias_codes.float(), codes.round())
    assert torch.equal(cm.fc1.bias_codes.float() * cm.fc1.bias_step, bfq(pm.get_parameter("fc1.bias"), w).detach())


def test_int_bias_on_a_dynamic_input_has_a_step_per_token():
    cfg = bfx.QuantConfig(weight="int8", input="int8", bias="int8")  # int8 input is dynamic per token
    pm = bfx.prepare_qat(mlp(), cfg)
    assert pm.get_submodule("0_bias_fq").per_token
    x = torch.randn(6, 32) * torch.logspace(-3, 1, 6).reshape(-1, 1)
    pm(x)
    cm = bfx.convert(pm.eval())
    assert cm.get_submodule("0").bias_kind == "IntBias(8) per token"
    with torch.no_grad():
        assert torch.equal(cm(x), pm(x))
    cfg = bfx.QuantConfig(weight=bfx.IntWeight(4, bfx.PerGroup(16)), input=bfx.IntActivation(**ACT4), bias="int8")
    with pytest.raises(bfx.ConfigError, match="IntBias needs one weight scale per output channel"):
        bfx.prepare_qat(mlp(), cfg)


@pytest.mark.parametrize("bits,fmt,nbytes", [(2, "int4", 16), (3, "int4", 16), (4, "int4", 16), (5, "int8", 32), (8, "int8", 32)])
def test_weight_bits_choose_the_storage(bits, fmt, nbytes):
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(32, 10)), bfx.weight_only(bfx.IntWeight(bits)))
    cm = bfx.convert(pm.eval())
    layer = cm.get_submodule("0")
    assert layer.weight_format == fmt
    assert layer.stored_weight.numel() * layer.stored_weight.element_size() == 10 * nbytes
    assert int(layer.int_weight().abs().max()) <= 2 ** (bits - 1) - 1
    x = torch.randn(4, 32)
    torch.testing.assert_close(cm(x), pm(x), rtol=1e-4, atol=1e-5)


def test_w4a8_fuses_the_int8_input_into_the_int4_op():
    cfg = bfx.QuantConfig(weight=bfx.IntWeight(4), input="int8")
    pm = bfx.prepare_qat(mlp((32, 64, 8)), cfg).eval()
    cm = bfx.convert(pm)
    assert "int4_linear" in cm.code and "quantize_dequantize" not in cm.code
    x = torch.randn(5, 32)
    a, b = pm(x), cm(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-3


def test_uncalibrated_static_quantizer_warns_at_convert():
    pm = bfx.prepare_qat(LeNet(), w3a4_mapping()).eval()
    with pytest.warns(UserWarning, match="never saw data"):
        bfx.convert(pm)


def test_converted_lowbit_model_exports_and_compiles_without_graph_breaks():
    cm = bfx.convert(_trained_lenet(1))
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(cm, (x,))
    torch.testing.assert_close(ep.module()(x), cm(x))
    torch.testing.assert_close(torch.compile(cm, fullgraph=True, backend="eager")(x), cm(x))


