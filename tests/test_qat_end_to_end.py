"""End to end as a user runs it: prepare -> train -> convert -> same predictions, smaller model."""
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


def test_summary_contents_prepared_and_converted(small_net):
    qc = (bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(nn.Conv2d, bfx.int8())
          .set_module_name("head", None))
    pm = bfx.prepare_qat(small_net, qc)
    s = bfx.summary(pm)
    rows = {r["layer"]: r for r in s.rows}
    assert set(rows) == {"conv", "conv_dw", "fc1", "w", "head"}
    assert rows["fc1"]["weight"] == "ternary" and rows["fc1"]["rule"] == '"global"'
    assert rows["conv"]["weight"] == "int8" and rows["conv"]["rule"] == "object_type(torch.nn.Conv2d)"
    assert rows["head"]["weight"] == "float" and rows["head"]["rule"] == "module_name('head')"
    assert rows["w"]["type"] == "F.linear" and rows["fc1"]["activation"] == "int8 per_token"
    assert rows["fc1"]["params"] == 128 * 64 + 64 and rows["fc1"]["bytes_fp32"] == 4 * (128 * 64 + 64)
    assert 0 < float(rows["fc1"]["zeros"].rstrip("%")) < 100
    cs = bfx.summary(bfx.convert(pm.eval()))
    crow = {r["layer"]: r for r in cs.rows}
    # measured bytes after convert equal the projection made on the prepared model
    for name in rows:
        assert crow[name]["bytes_quant"] == rows[name]["bytes_quant"], name
    assert crow["fc1"]["bytes_quant"] == 64 * 128 // 4 + 64 * 4 + 64 * 4  # packed + scales + bias
    text = str(cs)
    assert "TOTAL" in text and "4/5 quantized" in text and "module_name('head')" in text
    assert cs.totals["compression"] > 5


def test_summary_of_plain_model_is_an_error():
    import pytest
    with pytest.raises(bfx.BitlabError):
        bfx.summary(mlp())


def test_summary_of_model_with_nothing_quantizable():
    pm = bfx.prepare_qat(torch.nn.Sequential(torch.nn.ReLU()), bfx.ternary())
    s = bfx.summary(pm)
    assert s.totals["layers"] == 0 and s.totals["compression"] == 1.0
    text = str(s)
    assert "no quantizable layers" in text and "nan" not in text and "0/0" not in text
