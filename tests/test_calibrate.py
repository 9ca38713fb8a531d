"""Post-training calibration of static activation quantizers in eval mode (``bfx.calibrate``), and static
observers that trace into one torch.compile graph (no host sync in the observer)."""
import warnings

import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.quant.fake_quant import ActivationFakeQuant

STATIC = bfx.QuantConfig(weight=bfx.TernaryWeight(), input=bfx.IntActivation(8, dynamic=False, granularity="per_tensor"))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))


def _observers(pm):
    return [m for m in pm.modules() if isinstance(m, ActivationFakeQuant)]


def test_eval_mode_calibration_records_ranges_without_touching_batchnorm():
    pm = bfx.prepare_qat(_net(), STATIC).eval()
    bn = next(m for m in pm.modules() if isinstance(m, nn.BatchNorm1d))
    mean_before = bn.running_mean.clone()
    batches = [torch.randn(8, 16) * (i + 1) for i in range(3)]
    with torch.no_grad():
        pm(batches[0])  # eval mode outside the context: nothing observed
        assert all(float(m.running_amax) == 0 for m in _observers(pm))
        with bfx.calibrate(pm) as n:
            assert n == 2
            outs = [pm(x) for x in batches]
    first = _observers(pm)[0]
    expected = batches[0].abs().amax()  # first observation sets the range, later ones move it by momentum
    for x in batches[1:]:
        expected = torch.lerp(expected, x.abs().amax(), first.momentum)
    torch.testing.assert_close(first.running_amax, expected)
    assert torch.equal(bn.running_mean, mean_before)  # eval: BatchNorm statistics untouched
    assert torch.equal(outs[-1], pm(batches[-1]).detach())  # eval: deterministic, dropout off, range final
    frozen = first.running_amax.clone()
    with torch.no_grad():
        pm(batches[2] * 100)  # after the context: eval no longer observes
    assert torch.equal(first.running_amax, frozen)
    assert not any(m.calibrating for m in _observers(pm))


def test_calibrated_model_converts_without_range_warning_and_matches():
    pm = bfx.prepare_qat(_net(), STATIC).eval()
    with torch.no_grad(), bfx.calibrate(pm):
        for _ in range(4):
            pm(torch.randn(16, 16))
    x = torch.randn(5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an uncalibrated static quantizer would warn at convert
        cm = bfx.convert(pm)
    torch.testing.assert_close(cm(x), pm(x).detach(), rtol=1e-5, atol=1e-5)


def test_disabled_observers_stay_frozen_inside_calibrate():
    pm = bfx.prepare_qat(_net(), STATIC).eval()
    bfx.disable_observer(pm)
    with torch.no_grad(), bfx.calibrate(pm):
        pm(torch.randn(4, 16))
    assert all(float(m.running_amax) == 0 for m in _observers(pm))


def test_static_observer_training_step_compiles_without_graph_breaks():
    torch._dynamo.reset()
    pm = bfx.prepare_qat(_net(), STATIC).train()
    explanation = torch._dynamo.explain(pm)(torch.randn(8, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    learned = bfx.QuantConfig(weight=bfx.TernaryWeight(),
                              input=bfx.IntActivation(8, dynamic=False, granularity="per_tensor", learned=True))
    pl = bfx.prepare_qat(_net(), learned).train()
    for _ in range(9):  # past the initialisation batches, the learned step needs no host sync either
        pl(torch.randn(8, 16))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(pl)(torch.randn(8, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
