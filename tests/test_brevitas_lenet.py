"""The Brevitas tutorial's LowPrecisionLeNet as its seed writes it, as one mapping (issue 20): W3 and Int8Bias on
every layer, a 4-bit input quantizer on conv1 only (QuantIdentity), uint4 ReLU outputs (QuantReLU); the IntBias of
the layers after conv1 takes its step from the quantized ReLU that reaches them through max-pool and flatten."""
import io

import pytest
import torch
import torch.nn.functional as F
from _helpers import LeNet
from torch import nn

import bitlab_fx as bfx

STATIC = {"dynamic": False, "granularity": "per_tensor"}  # Brevitas' activation scales: one per tensor, observed


def seed_mapping(**act):
    w3 = bfx.IntWeight(bits=3)
    return (bfx.QConfigMapping()
            .set_global(bfx.QuantConfig(weight=w3, bias=bfx.IntBias(bits=8)))
            .set_module_name("conv1", bfx.QuantConfig(weight=w3, bias=bfx.IntBias(bits=8), input=bfx.IntActivation(bits=4, **act)))
            .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(bits=4, signed=False, **act))))


def _saved_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    fp32 = LeNet()
    pm = bfx.prepare_qat(fp32, seed_mapping(**STATIC))
    opt = torch.optim.Adam(pm.parameters(), lr=1e-3)
    for _ in range(4):
        x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
        loss = F.cross_entropy(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    return fp32, pm, bfx.convert(pm)


def test_converted_equals_prepared_bit_for_bit(trained):
    _, pm, cm = trained
    for batch in (1, 5, 64):
        x = torch.randn(batch, 3, 32, 32) * 2
        with torch.no_grad():
            assert torch.equal(cm(x), pm(x))


def test_every_layer_is_integer_arithmetic_with_explicit_requantization(trained):
    _, _, cm = trained
    ops = [n for n in cm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", None) == "bitlab"]
    layers = [n for n in ops if "quantize_dequantize" not in str(n.target)]
    assert [str(n.target) for n in layers] == ["bitlab.int4_conv2d.default"] * 2 + ["bitlab.int4_linear.default"] * 3
    for node in layers:  # int8 codes of a static multiplier: the op's sums are integers
        assert "per_tensor" in node.args and node.kwargs["act_multiplier"] is not None
    assert [n for n in layers if "bias_codes" in n.kwargs] == layers[:4]  # fc3 has no bias
    requant = [n for n in ops if "quantize_dequantize" in str(n.target)]
    assert [n.args[2:4] for n in requant] == [(4, True)] + [(4, False)] * 4  # the input, then each ReLU: 4 bits
    for name in ("conv1", "conv2", "fc1", "fc2"):
        layer = cm.get_submodule(name)
        assert layer.bias is None and layer.bias_codes.dtype == torch.int32
        assert int(layer.bias_codes.abs().max()) <= 128  # 8-bit codes, kept in int32


def test_bias_steps_come_from_the_upstream_relus(trained):
    _, pm, cm = trained
    assert pm.conv2_bias_fq.input_fq is pm.relu1_output_fq and pm.fc1_bias_fq.input_fq is pm.relu2_output_fq
    assert pm.conv1_bias_fq.input_fq is pm.conv1_input_fq
    g = cm.fc1.weight_scale  # per output channel; the input step is 1 / relu2's multiplier
    assert torch.equal(cm.fc1.bias_step, g / cm.fc1.act_multiplier)
    assert torch.equal(cm.fc1.act_multiplier, pm.relu2_output_fq.multiplier(torch.empty(0)).reshape(1))
    rows = {r["layer"]: r["input_scale"] for r in bfx.summary(cm).rows}
    assert rows == {"conv1": "own input=static", "conv2": "'relu1' via max_pool2d",
                    "fc1": "'relu2' via max_pool2d, reshape", "fc2": "'relu3'", "fc3": "'relu4'"}


def test_three_bit_weights_and_the_saved_size(trained):
    fp32, _, cm = trained
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        w = cm.get_submodule(name).int_weight()
        rows = w.reshape(w.shape[0], -1)
        assert int(rows.abs().max()) <= 3  # symmetric 3-bit: -3..3
        assert max(len(torch.unique(r)) for r in rows) <= 8
    assert _saved_bytes(cm) * 5 <= _saved_bytes(fp32)


def test_the_dynamic_defaults_say_what_to_change():
    """IntActivation is dynamic per token by default; an IntBias needs one static input step."""
    with pytest.raises(bfx.ConfigError, match=r"layer 'conv1' .*IntBias\(bits=8\) needs one static input scale.*"
                                              r"dynamic=True is IntActivation's default.*dynamic=False"):
        bfx.prepare_qat(LeNet(), seed_mapping())
