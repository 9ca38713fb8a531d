"""The fake-quant modules: values, the codes they hand over to the exact layer call, enable/blend switches."""
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.quant import primitives as P
from bitlab_fx.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant


def test_weight_fake_quant_value_is_codes_times_step():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    fq = WeightFakeQuant(bfx.IntWeight(4))
    codes, step = P.weight_codes(w, fq.spec)
    assert torch.equal(fq(w), codes * step.reshape(-1, 1))
    assert codes.abs().max() <= 7 and torch.equal(codes, codes.round())


def test_handed_over_codes_are_taken_once_and_only_for_the_same_tensor():
    torch.manual_seed(1)
    w = torch.randn(8, 32, requires_grad=True)
    fq = WeightFakeQuant(bfx.TernaryWeight())
    fq.hand_over = True
    fq(w)
    kept = fq.take_codes(w)
    assert kept is not None and torch.equal(kept[0], P.weight_codes(w, fq.spec)[0])
    assert fq.take_codes(w) is None  # taken: the next reader computes its own
    fq(w)
    assert fq.take_codes(torch.randn(8, 32)) is None  # another tensor
    fq(w)
    with torch.no_grad():
        w.mul_(2)  # changed in place since the forward: stale
    assert fq.take_codes(w) is None
    fq.hand_over = False
    fq(w)
    assert fq.take_codes(w) is None


def test_activation_codes_handed_over_equal_computed_ones():
    torch.manual_seed(2)
    x = torch.randn(5, 16) * 3
    fq = ActivationFakeQuant(bfx.IntActivation())
    fq.hand_over = True
    y = fq(x)
    q, s = fq.take_codes(x)
    assert torch.equal(q, torch.clamp(torch.round(x * s), -128, 127)) and s.shape == (5, 1)
    assert torch.equal(y, q / s)


def test_codes_are_not_kept_while_compiling():
    fq = WeightFakeQuant(bfx.TernaryWeight())
    fq.hand_over = True

    @torch.compile(backend="eager", fullgraph=True)
    def run(w):
        return fq(w) * 2

    w = torch.randn(4, 8)
    run(w)
    assert "_codes" not in fq.__dict__


@pytest.mark.parametrize("attr, value", [("enabled", False), ("mix", 0.0)])
def test_disabled_or_zero_mix_is_the_identity(attr, value):
    x = torch.randn(3, 8)
    for fq in (WeightFakeQuant(bfx.TernaryWeight()), ActivationFakeQuant(bfx.IntActivation())):
        setattr(fq, attr, value)
        assert fq(x) is x


def test_half_mix_blends_float_and_quantized():
    torch.manual_seed(3)
    x = torch.randn(3, 8)
    fq = ActivationFakeQuant(bfx.IntActivation())
    full = fq(x)
    fq.mix = 0.5
    assert torch.allclose(fq(x), 0.5 * x + 0.5 * full)


def test_kept_codes_are_dropped_by_a_float_layer_call_and_never_saved():
    import copy
    import io

    from bitlab_fx.quant import exact_layers

    torch.manual_seed(4)
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    afq, wfq = ActivationFakeQuant(bfx.IntActivation()), WeightFakeQuant(bfx.TernaryWeight())
    afq.hand_over = wfq.hand_over = True
    wfq.mix = 0.5  # warm-up: the layer is the float call and must not leave the input's codes behind
    exact_layers.linear(afq(x), wfq(w), None, codes_from=x, weight=w, input_quantizer=afq, weight_quantizer=wfq)
    assert "_codes" not in afq.__dict__ and "_codes" not in wfq.__dict__
    afq(x)
    assert "_codes" in afq.__dict__
    assert "_codes" not in copy.deepcopy(afq).__dict__
    buf = io.BytesIO()
    torch.save(afq, buf)
    buf.seek(0)
    assert "_codes" not in torch.load(buf, weights_only=False).__dict__
