"""bfx.summary: one row per layer (format, granularity, activation, rule, sizes) for prepared, converted and
partially traced models; honest totals."""
import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from _helpers import mlp


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
    with pytest.raises(bfx.BitlabError):
        bfx.summary(mlp())


def test_summary_of_model_with_nothing_quantizable():
    pm = bfx.prepare_qat(torch.nn.Sequential(torch.nn.ReLU()), bfx.ternary())
    s = bfx.summary(pm)
    assert s.totals["layers"] == 0 and s.totals["compression"] == 1.0
    text = str(s)
    assert "no quantizable layers" in text and "nan" not in text and "0/0" not in text


def test_summary_lists_float_weights_that_untraced_modules_use_functionally():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_qkv = nn.Parameter(torch.randn(96, 32) * 0.1)  # used with F.linear: invisible without a graph
            self.norm_scale = nn.Parameter(torch.ones(32))  # a vector, not a weight matrix: not listed
            self.proj = nn.Linear(32, 32)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: not traceable
                x = x * 0
            q, k, v = torch.nn.functional.linear(x * self.norm_scale, self.w_qkv).chunk(3, -1)
            return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))

    pm = bfx.prepare_qat(nn.Sequential(Attn(), nn.Linear(32, 4)), bfx.ternary())
    s = bfx.summary(pm)
    assert s.eager_weights == {"0.w_qkv": [96, 32]}
    assert "float weights of untraced modules (3,072 params, not in the table): 0.w_qkv [96, 32]" in str(s)
    assert s.totals["quantized"] == 2  # 0.proj and 1, as lone layers
