"""The public API end to end as a user runs it (api.py: prepare_qat -> train -> convert): same predictions, smaller model."""
import torch
from torch import nn

import bitlab_fx as bfx
from _helpers import mlp


def _task(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()  # 3 classes
    return x, y


def test_qat_loss_decreases_and_converted_model_keeps_accuracy():
    torch.manual_seed(0)
    x, y = _task()
    pm = bfx.prepare_qat(mlp((16, 64, 64, 3)), bfx.ternary())
    opt = torch.optim.Adam(pm.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = nn.functional.cross_entropy(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    pm.eval()
    cm = bfx.convert(pm)
    xt, yt = _task(256, seed=1)
    with torch.no_grad():
        acc_p = (pm(xt).argmax(1) == yt).float().mean().item()
        acc_c = (cm(xt).argmax(1) == yt).float().mean().item()
    assert acc_p > 0.7
    assert abs(acc_p - acc_c) <= 1 / 256 + 1e-9  # at most one borderline sample may flip
