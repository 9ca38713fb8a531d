"""The Brevitas tutorial's LowPrecisionLeNet as its seed writes it, as one mapping (issue 20), exactly as the issue
spells it: W3 and Int8Bias on every layer, a 4-bit input quantizer on conv1 only (QuantIdentity), uint4 ReLU
outputs (QuantReLU), every activation quantizer with IntActivation's defaults (dynamic, per token). conv1's IntBias
step is ``input_step[sample] * weight_step[channel]``, one per token (a conv's token is a sample); the layers after
conv1 take their input from a dynamic ReLU quantizer through max-pool and flatten, quantize it again per their own
tokens on its uint4 range, and their IntBias steps are per token too."""
import io

import pytest
import torch
import torch.nn.functional as F
from _helpers import LeNet
from torch import nn

import bitlab_fx as bfx

LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def seed_mapping():
    w3 = bfx.IntWeight(bits=3)
    return (bfx.QConfigMapping()
            .set_global(bfx.QuantConfig(weight=w3, bias=bfx.IntBias(bits=8)))
            .set_module_name("conv1", bfx.QuantConfig(weight=w3, bias=bfx.IntBias(bits=8), input=bfx.IntActivation(bits=4)))
            .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(bits=4, signed=False))))


def _saved_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def _train(pm, steps=4):
    opt = torch.optim.Adam(pm.parameters(), lr=1e-3)
    for _ in range(steps):
        x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
        loss = F.cross_entropy(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm.eval()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    fp32 = LeNet()
    pm = _train(bfx.prepare_qat(fp32, seed_mapping()))
    return fp32, pm, bfx.convert(pm)


def test_converted_equals_prepared_bit_for_bit(trained):
    _, pm, cm = trained
    for batch in (1, 3, 64):
        x = torch.randn(batch, 3, 32, 32) * torch.logspace(-2, 1, batch).reshape(-1, 1, 1, 1)  # own scale each
        with torch.no_grad():
            assert torch.equal(cm(x), pm(x))


def test_every_layer_is_integer_arithmetic_with_explicit_requantization(trained):
    _, _, cm = trained
    ops = [n for n in cm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", None) == "bitlab"]
    layers = [n for n in ops if "quantize_dequantize" not in str(n.target)]
    assert [str(n.target) for n in layers] == ["bitlab.int4_conv2d.default"] * 2 + ["bitlab.int4_linear.default"] * 3
    # each op quantizes its input per token (no float activations): conv1 4-bit signed, the others the uint4 range
    assert [(n.args[9 if "conv" in str(n.target) else 4], n.kwargs["act_bits"]) for n in layers] == \
        [("per_token", 4)] + [("per_token", 5)] * 4
    assert [n.kwargs.get("bias_bits", 0) for n in layers] == [8, 8, 8, 8, 0]  # fc3 has no bias
    requant = [n for n in ops if "quantize_dequantize" in str(n.target)]
    assert [n.args[2:4] for n in requant] == [(4, False)] * 4  # each ReLU: uint4, explicit in the graph
    for name in LAYERS[:4]:  # the float bias is kept: its codes depend on each token's step
        layer = cm.get_submodule(name)
        assert layer.bias_codes is None and layer.bias.dtype == torch.float32
        assert layer.bias_kind == "IntBias(8) per token" and layer.bias_step is None


def test_bias_codes_are_made_per_token_from_the_input_steps(trained):
    """The per-token codes are what the converted op adds: the bias term of one sample's output changes with that
    sample's input scale (round(b / (w_step / s[sample]))), not with the other samples."""
    _, pm, cm = trained
    assert pm.conv1_bias_fq.per_token and pm.conv1_bias_fq.input_fq is pm.conv1_input_fq
    assert pm.conv2_bias_fq.input_fq is pm.relu1_output_fq and pm.fc1_bias_fq.input_fq is pm.relu2_output_fq
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    conv1 = cm.conv1
    with torch.no_grad():
        pair = conv1(torch.stack([x[0], x[1] * 100]))
        alone = conv1(x[:1])
        zero_w = conv1.op_call(x[:1], bias=None)
        without = zero_w[0](*zero_w[1], **{k: v for k, v in zero_w[2].items() if k != "bias_bits"})
    assert torch.equal(pair[:1], alone)  # a sample's codes do not depend on the others in the batch
    s = 7 / x[0].abs().amax().clamp(min=1e-5)  # conv1's 4-bit multiplier of sample 0
    codes = torch.clamp(torch.round(conv1.bias / (conv1.weight_scale / s)), -128, 127)
    tol = 1e-5 * float(alone.abs().max())  # the two outputs' own fp32 rounding
    term = (alone - without)[0]  # the bias term: one number per channel, codes * w_step / s
    torch.testing.assert_close(term, (codes * conv1.weight_scale / s).reshape(-1, 1, 1).expand_as(term), rtol=0,
                               atol=tol)


def test_summary_says_where_each_input_scale_comes_from(trained):
    _, pm, cm = trained
    for model in (pm, cm):
        rows = {r["layer"]: r["input_scale"] for r in bfx.summary(model).rows}
        assert rows == {"conv1": "own input=dynamic per_token, bias step per token",
                        "conv2": "'relu1' via max_pool2d (dynamic: re-quantized per layer token), bias step per token",
                        "fc1": "'relu2' via max_pool2d, reshape (dynamic: re-quantized per layer token), bias step "
                               "per token",
                        "fc2": "'relu3' (dynamic: re-quantized per layer token), bias step per token",
                        "fc3": "'relu4' (dynamic: re-quantized per layer token)"}


def test_three_bit_weights_and_the_saved_size(trained):
    fp32, _, cm = trained
    for name in LAYERS:
        w = cm.get_submodule(name).int_weight()
        rows = w.reshape(w.shape[0], -1)
        assert int(rows.abs().max()) <= 3  # symmetric 3-bit: -3..3
        assert max(len(torch.unique(r)) for r in rows) <= 8
    assert _saved_bytes(cm) * 5 <= _saved_bytes(fp32)


def test_static_spelling_keeps_stored_int32_codes():
    """Brevitas' scales spelled static (one per tensor, observed): the bias step is one per channel, so convert
    stores the IntBias as int32 codes (no float bias), and converted == prepared bit for bit too."""
    static = {"dynamic": False, "granularity": "per_tensor"}
    w3 = bfx.IntWeight(bits=3)
    qc = (bfx.QConfigMapping()
          .set_global(bfx.QuantConfig(weight=w3, bias=bfx.IntBias(bits=8)))
          .set_module_name("conv1", bfx.QuantConfig(weight=w3, bias=bfx.IntBias(bits=8),
                                                    input=bfx.IntActivation(bits=4, **static)))
          .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(bits=4, signed=False, **static))))
    torch.manual_seed(0)
    pm = _train(bfx.prepare_qat(LeNet(), qc), steps=2)
    cm = bfx.convert(pm)
    for name in LAYERS[:4]:
        layer = cm.get_submodule(name)
        assert layer.bias is None and layer.bias_codes.dtype == torch.int32 and layer.bias_kind == "int32 codes"
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(cm(x), pm(x))
