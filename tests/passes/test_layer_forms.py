"""Layer forms (passes/layer_forms.py): nn.Linear subclasses that override forward are quantized when they are a
plain linear map, else left float with a warning and a reason; parametrized weights (weight norm) stay float with
a reason, and prepare, summary and exclusion rules all work."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import bitlab_fx as bfx


class MatmulLinear(nn.Linear):  # Falcon's FalconLinear: the same map, written with @
    def forward(self, x):
        return x @ self.weight.T + self.bias


class DoubledLinear(nn.Linear):  # not a linear map of its weight
    def forward(self, x):
        return 2 * (x @ self.weight.T)


def _net(cls):
    return nn.Sequential(cls(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_plain_linear_subclass_is_quantized_and_converts():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    pm = bfx.prepare_qat(_net(MatmulLinear), bfx.ternary(), (x,))
    rows = {r["layer"]: r["weight"] for r in bfx.summary(pm).rows}
    assert rows == {"0": "ternary", "2": "ternary"}
    pm(x).sum().backward()
    cm = bfx.convert(pm.eval())
    assert sum(isinstance(m, bfx.QuantizedLinear) for m in cm.modules()) == 2
    with torch.no_grad():
        assert torch.allclose(cm(x), pm(x), atol=1e-5)


def test_other_linear_subclass_warns_and_is_listed_float():
    x = torch.randn(5, 8)
    with pytest.warns(UserWarning, match="DoubledLinear subclasses nn.Linear but its forward is not a plain linear"):
        pm = bfx.prepare_qat(_net(DoubledLinear), bfx.ternary(), (x,))
    s = bfx.summary(pm)
    assert [r["layer"] for r in s.rows] == ["2"]
    assert "DoubledLinear overrides nn.Linear.forward" in s.skipped["0"]
    assert s.float_weights["0.weight"] == ([16, 8], s.skipped["0"])
    assert s.totals["quantized_share"] == pytest.approx((16 * 4 + 4) / (16 * 4 + 4 + 16 * 8))


class PosConv(nn.Module):  # wav2vec2's positional conv: weight norm through torch.nn.utils.parametrize
    def __init__(self):
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1), dim=2)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # [B, L, C]
        return self.proj(x + self.conv(x.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("qconfig", [bfx.ternary(), bfx.QConfigMapping().set_global(bfx.ternary())
                                     .set_module_name("conv", None)])
def test_parametrized_weight_stays_float_with_the_reason(qconfig):
    x = torch.randn(2, 6, 8)
    pm = bfx.prepare_qat(PosConv(), qconfig, (x,))
    s = bfx.summary(pm)
    assert [r["layer"] for r in s.rows if r["weight"] != "float"] == ["proj"]
    assert "parametrized" in s.skipped["conv"] and "remove_parametrizations" in s.skipped["conv"]
    pm(x).sum().backward()
    assert pm.get_parameter("conv.parametrizations.weight.original1").grad is not None  # trains, in float
    cm = bfx.convert(pm.eval())
    with torch.no_grad():
        assert torch.allclose(cm(x), pm(x), atol=1e-5)
    assert "parametrized" in str(bfx.summary(cm))
