"""BitLinear (eager) against the graph route: same weights and config give the same numbers."""
import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx import BitQuantConfig
from bitlab_fx.nn import BitLinear

CONFIGS = [BitQuantConfig(), BitQuantConfig(weight_granularity="per_channel", activation_granularity="per_token"),
           BitQuantConfig(activation_dtype="float32", weight_granularity="per_channel")]


def _pair(cfg, seed=0):
    """A float nn.Linear model and the same weights in BitLinear layers."""
    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10))
    eager = nn.Sequential(BitLinear(48, 64, quant_config=cfg), nn.ReLU(), BitLinear(64, 10, quant_config=cfg))
    eager.load_state_dict(plain.state_dict(), strict=False)  # same parameter names as nn.Linear
    return plain, eager


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.activation_dtype}-{c.activation_granularity}-{c.weight_granularity}")
def test_eager_and_graph_routes_agree(cfg):
    plain, eager = _pair(cfg)
    pm = bfx.prepare_qat(plain, cfg)  # BitQuantConfig accepted as the qconfig
    x = torch.randn(16, 48)
    torch.testing.assert_close(eager.train()(x), pm.train()(x), rtol=0, atol=0)  # same fake-quant math
    with torch.no_grad():
        y_eager_eval, y_graph_eval = eager.eval()(x), pm.eval()(x)
        cm = bfx.convert(pm)
        y_conv = cm(x)
        for m in eager:
            if isinstance(m, BitLinear):
                m.deploy()
        y_dep = eager(x)
    torch.testing.assert_close(y_eager_eval, y_graph_eval, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_dep, y_conv, rtol=0, atol=0)  # both the packed ternary op on the same buffers
    assert torch.equal(eager[0].deployed.packed_weight, cm.get_submodule("0").packed_weight)


def test_train_mode_learns_through_straight_through_gradients():
    torch.manual_seed(0)
    layer = BitLinear(32, 4, quant_config=BitQuantConfig())
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = nn.functional.cross_entropy(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert layer.weight.grad is not None and loss.item() < first


def test_eval_requantizes_when_the_weight_changes():
    layer = BitLinear(16, 8, quant_config=BitQuantConfig()).eval()
    x = torch.randn(4, 16)
    before = layer(x)
    q0 = layer.qweight.clone()
    with torch.no_grad():
        layer.weight.neg_()
    after = layer(x)
    assert torch.equal(layer.qweight, -q0)  # rebuilt, not stale
    torch.testing.assert_close(after - layer.bias, -(before - layer.bias), rtol=1e-5, atol=1e-5)


def test_state_dict_is_the_float_checkpoint_in_train_and_eval():
    layer = BitLinear(16, 8, quant_config=BitQuantConfig())
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert set(layer.eval().state_dict()) == {"weight", "bias"}


def test_quant_warmup_and_disable_fake_quant_reach_bitlinear():
    layer = BitLinear(16, 8, quant_config=BitQuantConfig())
    x = torch.randn(4, 16)
    bfx.disable_fake_quant(layer)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    bfx.enable_fake_quant(layer)
    warm = bfx.QuantWarmup(layer, ramp_steps=10)
    assert warm.mix == 0.0


def test_bitlinear_rejects_a_foreign_config():
    with pytest.raises(bfx.ConfigError, match="BitQuantConfig"):
        BitLinear(4, 4, quant_config=bfx.ternary())


def test_eval_bitlinear_honours_disabled_fake_quant_and_warmup():
    torch.manual_seed(0)
    layer = BitLinear(64, 32, quant_config=BitQuantConfig())
    x = torch.randn(4, 64)
    quantized = layer.eval()(x)
    bfx.disable_fake_quant(layer)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))  # eval: float too
    bfx.enable_fake_quant(layer)
    warm = bfx.QuantWarmup(layer, ramp_steps=4)
    warm.step()
    warm.step()
    mid = layer(x)
    expected = layer.train()(x).detach()  # the train-mode blend at mix 0.5
    torch.testing.assert_close(layer.eval()(x), expected)
    assert not torch.allclose(mid, quantized, atol=1e-4)
    warm.step()
    warm.step()
    torch.testing.assert_close(layer(x), quantized)  # fully enabled again: the integer path
