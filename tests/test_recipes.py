"""QAT recipes: learned (LSQ) weight and activation scales, their config, state_dict and convert."""
import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.quant import primitives as P

STATIC_LEARNED = bfx.IntActivation(8, dynamic=False, granularity="per_tensor", learned=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _fit(model, steps=25, lr=1e-2, shape=(32, 32), out=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape[-1] if len(shape) == 2 else 1, out, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(steps):
        x = torch.randn(*shape, generator=g)
        y = x @ teacher if len(shape) == 2 else torch.randn(shape[0], out, generator=g)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_learned_weight_scale_is_a_parameter_initialised_from_absmean_and_trained():
    torch.manual_seed(0)
    model = Net()
    pm = bfx.prepare_qat(model, bfx.ternary(weight_scale="learned"))
    params = dict(pm.named_parameters())
    assert {"fc1_weight_fq.scale", "fc2_weight_fq.scale"} <= set(params)
    assert params["fc1_weight_fq.scale"].shape == (64,)
    assert torch.equal(params["fc1_weight_fq.scale"].detach(), model.fc1.weight.abs().mean(1).clamp(min=P.EPS))
    init = params["fc1_weight_fq.scale"].detach().clone()
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)  # the optimizer sees it through model.parameters()
    x = torch.randn(16, 32)
    pm(x).pow(2).sum().backward()
    assert params["fc1_weight_fq.scale"].grad is not None and params["fc1_weight_fq.scale"].grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(params["fc1_weight_fq.scale"].detach(), init)


@pytest.mark.parametrize("weight", [bfx.IntWeight(4, scale="learned"), bfx.TernaryWeight(bfx.PerGroup(16), "learned"),
                                    bfx.TernaryWeight("per_tensor", "learned")])
def test_learned_weight_scale_granularities_train(weight):
    pm = bfx.prepare_qat(Net(), bfx.QuantConfig(weight=weight, input="int8"))
    scale = pm.fc1_weight_fq.scale
    assert scale.shape == P.scale_shape((64, 32), weight.granularity)
    init = scale.detach().clone()
    _fit(pm, steps=5)
    assert not torch.equal(scale.detach(), init)


def test_learned_activation_scale_initialised_from_first_batches_then_trained():
    torch.manual_seed(0)
    pm = bfx.prepare_qat(Net(), bfx.QuantConfig(weight="ternary", input=STATIC_LEARNED))
    fq = pm.fc1_input_fq
    assert "fc1_input_fq.scale" in dict(pm.named_parameters())
    pm.train()
    x = torch.randn(16, 32) * 3
    pm(x)
    assert torch.allclose(fq.scale.detach(), x.abs().amax() / 127)  # first batch: its range
    _fit(pm, steps=fq.init_batches + 10)
    assert int(fq.observed_batches) == fq.init_batches  # the observer stopped after the first batches
    assert fq.scale.grad is not None and fq.scale.grad.abs() > 0
    assert not torch.allclose(fq.scale.detach(), fq.running_amax / 127)  # moved by the optimizer since


@pytest.mark.parametrize("config", [
    bfx.ternary(weight_scale="learned"),
    bfx.QuantConfig(weight=bfx.TernaryWeight(scale="learned"), input=STATIC_LEARNED),
    bfx.QuantConfig(weight=bfx.TernaryWeight(scale="learned"), input=STATIC_LEARNED, bias="int8"),
    bfx.QuantConfig(weight=bfx.IntWeight(4, scale="learned"),
                    input=bfx.IntActivation(4, signed=False, dynamic=False, granularity="per_tensor", learned=True)),
    bfx.QuantConfig(weight=bfx.TernaryWeight(bfx.PerGroup(16), "learned"), input="int8"),
], ids=lambda c: c.describe())
def test_converted_equals_prepared_with_learned_scales(config):
    torch.manual_seed(0)
    pm = _fit(bfx.prepare_qat(Net(), config))
    cm = bfx.convert(pm)
    x = torch.randn(64, 32)
    with torch.no_grad():
        a, b = pm(x), cm(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    assert "fc1_weight_fq.scale" not in cm.state_dict()
    container = cm.get_submodule("fc1")
    torch.testing.assert_close(container.weight_scale, pm.fc1_weight_fq.scale.detach().abs().clamp(min=P.EPS))  # as learned


def test_converted_equals_prepared_learned_conv():
    torch.manual_seed(0)
    cfg = bfx.QuantConfig(weight=bfx.TernaryWeight(scale="learned"), input=STATIC_LEARNED)
    pm = _fit(bfx.prepare_qat(ConvNet(), cfg), steps=10, shape=(8, 3, 6, 6), out=4)
    cm = bfx.convert(pm)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        a, b = pm(x), cm(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_state_dict_keys_of_learned_and_plain_configs():
    model = Net()
    plain = bfx.prepare_qat(model, bfx.ternary())
    plain.load_state_dict(model.state_dict())  # strict: no extra keys without learned scales
    learned = bfx.prepare_qat(model, bfx.QuantConfig(weight=bfx.TernaryWeight(scale="learned"), input=STATIC_LEARNED))
    extra = set(learned.state_dict()) - set(model.state_dict())
    assert extra == {f"{l}_{k}" for l in ("fc1", "fc2")
                     for k in ("weight_fq.scale", "input_fq.scale", "input_fq.running_amax", "input_fq.observed_batches")}
    learned.load_state_dict(model.state_dict(), strict=False)
    again = bfx.prepare_qat(model, bfx.ternary(weight_scale="learned"))
    _fit(learned, steps=3)
    again_sd = {k: v for k, v in learned.state_dict().items() if "input_fq" not in k}
    again.load_state_dict(again_sd)  # a prepared checkpoint round-trips, scales included
    assert torch.equal(again.fc1_weight_fq.scale, learned.fc1_weight_fq.scale)


def test_reset_scale_after_loading_float_weights():
    model, other = Net(), Net()
    pm = bfx.prepare_qat(model, bfx.ternary(weight_scale="learned"))
    pm.load_state_dict(other.state_dict(), strict=False)
    pm.fc1_weight_fq.reset_scale(pm.fc1.weight)
    assert torch.equal(pm.fc1_weight_fq.scale.detach(), other.fc1.weight.abs().mean(1).clamp(min=P.EPS))


def test_warmup_with_learned_scales():
    pm = bfx.prepare_qat(Net(), bfx.QuantConfig(weight=bfx.TernaryWeight(scale="learned"), input=STATIC_LEARNED))
    warm = bfx.QuantWarmup(pm, ramp_steps=4, delay_steps=2)
    pm.train()
    for _ in range(8):
        pm(torch.randn(4, 32)).sum().backward()
        warm.step()
    assert int(pm.fc1_input_fq.observed_batches) > 0  # observed once the ramp started
    assert pm.fc1_weight_fq.scale.grad is not None


@pytest.mark.parametrize("make, match", [
    (lambda: bfx.TernaryWeight(scale="lsq"), r"TernaryWeight\(scale='lsq'\).*learned"),
    (lambda: bfx.IntWeight(4, scale="absmean"), r"IntWeight\(bits=4, scale='absmean'\).*absmax, learned"),
    (lambda: bfx.IntActivation(8, learned=True), r"learned=True, dynamic=True.*dynamic=False, granularity='per_tensor'"),
    (lambda: bfx.IntActivation(8, dynamic=False, granularity="per_tensor", learned="yes"), r"learned must be True or False"),
    (lambda: bfx.IntActivation(8, signed="yes"), r"signed must be True or False"),
    (lambda: bfx.IntActivation(8, dynamic=None), r"dynamic must be True or False"),
    (lambda: bfx.ternary(weight_scale="learnt"), r"scale='learnt'"),
])
def test_config_validation_errors(make, match):
    with pytest.raises(bfx.ConfigError, match=match):
        make()


def test_to_dict_round_trip_and_old_dicts():
    cfgs = [bfx.QuantConfig(weight=bfx.TernaryWeight(bfx.PerGroup(64), "learned"), input=STATIC_LEARNED, bias="int8"),
            bfx.QuantConfig(weight=bfx.IntWeight(3, scale="learned"), output=STATIC_LEARNED)]
    for cfg in cfgs:
        d = cfg.to_dict()
        assert bfx.QuantConfig.from_dict(d) == cfg
    assert cfgs[0].to_dict()["input"]["learned"] is True
    old = {"weight": {"type": "IntWeight", "bits": 4, "granularity": "per_channel"},
           "input": {"type": "IntActivation", "bits": 8, "signed": True, "granularity": "per_token", "dynamic": True}}
    cfg = bfx.QuantConfig.from_dict(old)  # dicts written before learned scales existed still load
    assert cfg.weight.scale == "absmax" and cfg.input.learned is False
    assert "learned" in cfgs[0].describe()
