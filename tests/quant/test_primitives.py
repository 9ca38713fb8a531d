import pytest
import torch
from hypothesis import given, settings, strategies as st

import bitlab_fx as bfx
from bitlab_fx.quant import primitives as P
from bitlab_fx.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant

shapes = st.tuples(st.integers(1, 9), st.integers(1, 40))
grans = st.sampled_from(["per_tensor", "per_channel"])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, gran=grans, seed=st.integers(0, 2**16), mag=st.sampled_from([1e-6, 1.0, 1e4]))
def test_ternary_values_and_positive_scale(shape, gran, seed, mag):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * mag
    wq, scale = P.quantize_weight(w, bfx.TernaryWeight(gran))
    assert wq.dtype == torch.int8 and set(wq.unique().tolist()) <= {-1, 0, 1}
    assert (scale > 0).all() and torch.isfinite(scale).all()
    # absmean: g is the mean |w| of its group
    if gran == "per_channel":
        torch.testing.assert_close(scale, w.abs().mean(1).clamp(min=P.EPS))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), shape=shapes, seed=st.integers(0, 2**16))
def test_int_weights_in_range_and_error_bounded(bits, shape, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    spec = bfx.IntWeight(bits, "per_channel")
    wq, g = P.quantize_weight(w, spec)
    q = 2 ** (bits - 1) - 1
    assert wq.abs().max() <= q
    err = (wq.float() * g[:, None] - w).abs()
    assert (err <= g[:, None] / 2 + 1e-6).all()  # round to nearest: at most half a step


def test_per_group_scales():
    w = torch.randn(4, 64)
    wq, g = P.quantize_weight(w, bfx.TernaryWeight(bfx.PerGroup(16)))
    assert g.shape == (4, 4)
    torch.testing.assert_close(g, w.reshape(4, 4, 16).abs().mean(-1))


def test_zero_weights_and_inputs_give_no_nan():
    wq, g = P.quantize_weight(torch.zeros(3, 8), bfx.TernaryWeight())
    assert (wq == 0).all() and torch.isfinite(g).all()
    fq = ActivationFakeQuant(bfx.IntActivation())
    assert (fq(torch.zeros(2, 8)) == 0).all()


def test_activation_fake_quant_is_int8_grid_per_token():
    x = torch.randn(5, 33) * torch.tensor([1e-3, 1, 10, 100, 1e3])[:, None]
    fq = ActivationFakeQuant(bfx.IntActivation(8, True, "per_token"))
    y = fq(x)
    s = 127 / x.abs().amax(1, keepdim=True)
    codes = y * s
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert (codes.round().abs() <= 127).all()
    torch.testing.assert_close(y, x, atol=(1 / s).max().item(), rtol=0)


def test_unsigned_activation_clamps_negative():
    fq = ActivationFakeQuant(bfx.IntActivation(4, signed=False, granularity="per_tensor"))
    y = fq(torch.tensor([[-1.0, 0.5, 1.0]]))
    assert y[0, 0] == 0 and y[0, 2] == 1.0


def test_straight_through_gradients():
    w = torch.randn(4, 8, requires_grad=True)
    WeightFakeQuant(bfx.TernaryWeight())(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(3, 8, requires_grad=True)
    (ActivationFakeQuant(bfx.IntActivation())(x) * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_static_activation_observes_in_train_and_freezes_in_eval():
    fq = ActivationFakeQuant(bfx.IntActivation(8, True, "per_tensor", dynamic=False))
    fq.train()
    fq(torch.full((2, 4), 2.0))
    assert fq.running_amax.item() == 2.0
    fq(torch.full((2, 4), 4.0))
    assert 2.0 < fq.running_amax.item() < 4.0
    fq.eval()
    before = fq.running_amax.clone()
    fq(torch.full((2, 4), 100.0))
    assert torch.equal(fq.running_amax, before)


def test_disabled_fake_quant_is_identity():
    fq = WeightFakeQuant(bfx.TernaryWeight())
    fq.enabled = False
    w = torch.randn(3, 3)
    assert fq(w) is w


def test_warmup_blends_float_to_quantized():
    import bitlab_fx as bfx
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    pm = bfx.prepare_qat(model, bfx.ternary())
    x = torch.randn(4, 16)
    full = pm(x).detach()
    warm = bfx.QuantWarmup(pm, ramp_steps=4, delay_steps=2)
    torch.testing.assert_close(pm(x), model(x))          # delay: float
    for _ in range(4):
        warm.step()
    assert warm.mix == 0.5
    mid = pm(x)
    assert not torch.allclose(mid, full) and not torch.allclose(mid, model(x))
    for _ in range(2):
        warm.step()
    torch.testing.assert_close(pm(x), full)              # after the ramp: plain QAT
    state = warm.state_dict()
    warm2 = bfx.QuantWarmup(pm, ramp_steps=4, delay_steps=2)
    warm2.load_state_dict(state)
    assert warm2.mix == 1.0


def test_dynamic_activation_codes_and_weight_codes_match_their_formulas():
    """The codes written over their scratch tensors are the formulas' numbers: activations
    clamp(round(x * qmax / max|x|), qmin, qmax) per token (or max(x, 0) unsigned), ternary weights
    clamp(round(w / mean|w|), -1, 1) per row."""
    torch.manual_seed(3)
    x = torch.randn(2, 16, 40) * 3
    for spec in (bfx.IntActivation(), bfx.IntActivation(4), bfx.IntActivation(8, signed=False)):
        ranges = x.abs() if spec.signed else x.clamp(min=0)
        mult = spec.qmax / ranges.amax(-1, keepdim=True).clamp(min=1e-5)
        codes, s = P.dynamic_activation_codes(x, spec, 1)
        assert torch.equal(s, mult)
        assert torch.equal(codes, torch.clamp(torch.round(x * mult), spec.qmin, spec.qmax))
    w = torch.randn(24, 40)
    wq, g = P.weight_codes(w, bfx.TernaryWeight())
    step = w.abs().mean(-1).clamp(min=1e-5)
    assert torch.equal(g, step)
    assert torch.equal(wq, torch.clamp(torch.round(w / step[:, None]), -1, 1))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", bfx.PerGroup(4)])
def test_int8_codes_dequantize_to_the_fp32_codes_numbers(granularity):
    """int8 codes (what the integer training forward saves) give bitwise the values of the same codes in fp32."""
    torch.manual_seed(0)
    wq = torch.randint(-127, 128, (6, 8), dtype=torch.int8)
    g = P.weight_scale(torch.randn(6, 8), bfx.IntWeight(8, granularity=granularity))
    assert torch.equal(P.dequantize_weight(wq, g, granularity), P.dequantize_weight(wq.float(), g, granularity))
    xq, mult = torch.randint(-128, 128, (5, 8), dtype=torch.int8), torch.rand(5, 1) * 300
    assert torch.equal(P.dequantize_activation(xq, mult, torch.float32), xq.float() / mult)
    assert torch.equal(P.dequantize_activation(xq, mult, torch.bfloat16), (xq.float() / mult).bfloat16())
