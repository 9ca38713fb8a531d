"""Weights read outside their layer call (capture/outside_reads.py): with example_inputs, a lone layer whose weight
eager model code needs (Mamba's mixer) stays float with the reason; one whose weight is read for its dtype only
(T5) is quantized; the converted model runs and agrees with the prepared one."""
import torch
from torch import nn

import bitlab_fx as bfx


class Mixer(nn.Module):  # data-dependent control flow: not traceable; its layers become lone layers
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.dt = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):  # [B, L, C]
        h = self.conv(x.transpose(1, 2)).transpose(1, 2) if x.sum() > -1e9 else x
        step = h @ self.dt.weight.t()  # the weight itself, outside the layer call
        return self.out(step.to(self.out.weight.dtype))  # the dtype only


def test_layer_whose_weight_is_needed_outside_its_call_stays_float():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    pm = bfx.prepare_qat(Mixer(), bfx.ternary(), (x,))
    s = bfx.summary(pm)
    assert {r["layer"]: r["weight"] for r in s.rows} == {"conv": "ternary", "dt": "float", "out": "ternary"}
    assert "read outside its layer call" in s.skipped["dt"] and "h @ self.dt.weight.t()" in s.skipped["dt"]
    assert type(pm.dt) is nn.Linear  # the float layer itself, back in place
    pm(x).sum().backward()
    assert pm.dt.weight.grad is not None
    cm = bfx.convert(pm.eval())
    with torch.no_grad():
        assert torch.allclose(cm(x), pm(x), atol=1e-5)
    assert s.totals["quantized_share"] == (24 + 8 + 64 + 8) / (24 + 8 + 64 + 8 + 64 + 8)
