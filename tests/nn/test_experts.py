"""Experts modules with 3-D weights: prepared (fake quant) and converted (packed, one grouped op per projection)."""
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.errors import ConvertError
from bitlab_fx.nn.experts import FakeQuantExperts, QuantizedExperts, follows_experts_contract

from _moe_tiny import EXPERTS, HIDDEN, INTER, experts, routing

CONFIGS = {
    "ternary": bfx.ternary(),
    "int4-g16-weight-only": bfx.weight_only(bfx.IntWeight(4, granularity="per_group:16")),
    "int8-per-tensor-static": bfx.QuantConfig(weight=bfx.IntWeight(8, granularity="per_tensor"),
                                              input=bfx.IntActivation(8, dynamic=False, granularity="per_tensor")),
    "int8-dynamic-per-tensor": bfx.QuantConfig(weight="int8", input=bfx.IntActivation(8, granularity="per_tensor")),
    "ternary-learned-per-expert": bfx.QuantConfig(weight=bfx.TernaryWeight("per_tensor", scale="learned"), input="int8"),
}


def _prepared(kind="mixtral", config=bfx.ternary(), configs=None):
    module = experts(kind)
    names = ("gate_up_proj", "down_proj")
    configs = configs or {p: config for p in names}
    fq = FakeQuantExperts(module, configs, {p: '"global"' for p in names}, "mlp.experts")
    h, idx, w = routing(16, seed=5)
    fq.train()(h, idx, w)  # static input quantizers observe a batch
    return module, fq.eval()


@pytest.mark.parametrize("kind", ["mixtral", "gptoss"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tokens", [1, 9], ids=["decode", "prefill"])
def test_converted_experts_compute_the_prepared_experts_bitwise(kind, name, tokens):
    _, fq = _prepared(kind, CONFIGS[name])
    q = QuantizedExperts(fq)
    h, idx, w = routing(tokens)
    with torch.no_grad():
        expected = fq(h, idx, w)
        got = q(h, idx, w)
    if CONFIGS[name].input is None:  # weight-only: the kernel sums float products in its own order (as for linears)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # int8 codes: the same integer sums and rescale, bit for bit
        assert torch.equal(got, expected)
    assert expected.shape == (tokens, HIDDEN)


@pytest.mark.parametrize("kind", ["mixtral", "gptoss"])
def test_with_fake_quant_off_the_prepared_experts_are_the_models_experts(kind):
    module, fq = _prepared(kind)
    bfx.disable_fake_quant(fq)
    h, idx, w = routing(9)
    with torch.no_grad():
        torch.testing.assert_close(fq(h, idx, w), module(h, idx, w), rtol=1e-5, atol=1e-5)


def test_quantized_experts_get_gradients_through_the_straight_through_estimator():
    module, fq = _prepared()
    h, idx, w = routing(3)
    idx = torch.tensor([[0, 1], [1, 0], [0, 2]])  # expert 3 gets no token
    fq.train()(h, idx, w).square().sum().backward()
    assert fq.gate_up_proj is module.gate_up_proj  # the model's own parameter trains
    for p in (fq.gate_up_proj, fq.down_proj):
        per_expert = p.grad.abs().flatten(1).sum(1)
        assert (per_expert[:3] > 0).all() and per_expert[3] == 0
    before = fq.eval()(h, idx, w).detach()
    torch.optim.SGD(fq.parameters(), lr=0.5).step()
    assert not torch.equal(fq(h, idx, w).detach(), before)


def test_per_tensor_weights_take_one_step_per_expert():
    _, fq = _prepared(config=bfx.weight_only(bfx.IntWeight(8, granularity="per_tensor")))
    q = QuantizedExperts(fq)
    w = fq.gate_up_proj.detach()
    expected = w.abs().flatten(1).amax(1) / 127  # absmax of each expert, written out here
    assert q.gate_up_proj.weight_scale.shape == (EXPERTS, 1)
    torch.testing.assert_close(q.gate_up_proj.weight_scale.reshape(-1), expected)
    codes = q.gate_up_proj.int_weight()
    assert codes.shape == (EXPERTS, 2 * INTER, HIDDEN) and codes.abs().flatten(1).amax(1).eq(127).all()


def test_a_projection_kept_float_stays_a_parameter():
    _, fq = _prepared(configs={"gate_up_proj": bfx.ternary(), "down_proj": None})
    q = QuantizedExperts(fq)
    assert isinstance(q.down_proj, torch.nn.Parameter) and not hasattr(fq, "down_proj_weight_fq")
    h, idx, w = routing(5)
    with torch.no_grad():
        assert torch.equal(q(h, idx, w), fq(h, idx, w))


def test_state_dict_round_trip_and_mismatch():
    _, fq = _prepared()
    q = QuantizedExperts(fq)
    state = q.state_dict()
    assert {"gate_up_proj.packed_weight", "gate_up_proj.weight_scale", "down_proj.packed_weight"} <= set(state)
    other = QuantizedExperts(_prepared(config=bfx.ternary())[1])
    other.load_state_dict(state)
    h, idx, w = routing(4)
    assert torch.equal(other(h, idx, w), q(h, idx, w))
    int8 = QuantizedExperts(_prepared(config=bfx.int8())[1])
    with pytest.raises((ConvertError, RuntimeError), match="does not match|size mismatch"):
        int8.load_state_dict(state)


def test_bfloat16_keeps_fp32_steps():
    _, fq = _prepared()
    q = QuantizedExperts(fq).to(torch.bfloat16)
    h, idx, w = routing(4)
    assert q.gate_up_proj.weight_scale.dtype == torch.float32
    assert q(h.bfloat16(), idx, w.bfloat16()).dtype == torch.bfloat16


def test_contract_is_transformers_experts_modules_only():
    assert follows_experts_contract(experts("mixtral")) and follows_experts_contract(experts("gptoss"))
    plain = torch.nn.Module()
    plain.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 4, 4))
    assert not follows_experts_contract(plain)
