"""The BitLab "Getting Started" tutorial runs on bitlab_fx with only its import lines changed.

``test_every_tutorial_snippet_runs`` reads the tutorial from ``../shared/seeds`` (beside the repo in CI)
and executes each python block in order in one namespace. The other tests keep the tutorial's
essential claims as ordinary tests that never skip.
"""
import pathlib
import re

import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx import BitQuantConfig
from bitlab_fx.models import AutoBitModel, BitMLPConfig
from bitlab_fx.nn import BitLinear

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEEDS = ROOT.parent / "shared" / "seeds"
IMPORTS = {
    "from bitcore.config import BitQuantConfig": "from bitlab_fx import BitQuantConfig",
    "from bitlayers.bitlinear import BitLinear": "from bitlab_fx.nn import BitLinear",
    "from bitmodels import AutoBitModel": "from bitlab_fx.models import AutoBitModel",
    "from bitmodels.mlp import BitMLPConfig": "from bitlab_fx.models import BitMLPConfig",
}
# Names some snippets use without defining them (the tutorial leaves them to the reader), keyed by a
# line of the snippet that needs them.
READER_NAMES = {
    "for epoch in range(num_epochs):": lambda ns: {"num_epochs": 1, "input": torch.randn(4, 256)},
    "layer2 = BitLinear(50, 10, quant_config=config2)": lambda ns: {"config1": BitQuantConfig(),
                                                                     "config2": BitQuantConfig(weight_granularity="per_channel")},
    "output = layer(x)  # Uses full precision weights": lambda ns: {"x": torch.randn(32, ns["layer"].in_features)},
}


def _tutorial():
    found = sorted(SEEDS.glob("*.txt")) if SEEDS.is_dir() else []
    for path in found:
        text = path.read_text(errors="replace")
        if "Getting Started with BitLab" in text:
            return text
    return None


def test_every_tutorial_snippet_runs(capsys):
    text = _tutorial()
    if text is None:
        pytest.skip(f"the BitLab tutorial is not at {SEEDS} (it lives in ../shared/seeds beside the repo in CI)")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 10
    ns = {"__name__": "__tutorial__"}
    for i, code in enumerate(blocks):
        for old, new in IMPORTS.items():
            code = code.replace(old, new)
        assert not re.search(r"^\s*from bit(core|layers|models)", code, re.M), f"unmapped import in block {i}"
        for marker, names in READER_NAMES.items():
            if marker in code:
                ns.update(names(ns))
        try:
            exec(compile(code, f"bitlab tutorial [block {i}]", "exec"), ns)
        except Exception as e:
            raise AssertionError(f"tutorial block {i} failed: {type(e).__name__}: {e}\n{code}") from e
    out = capsys.readouterr().out
    assert "Training output shape: torch.Size([32, 256])" in out
    assert "Quantized weight dtype: torch.int8" in out
    assert "Model output shape: torch.Size([64, 10])" in out
    assert "Auto model output: torch.Size([1, 10])" in out
    assert "Layer is quantized (eval mode)" in out
    assert ns["layer"].deployed is not None and ns["layer"].weight is None


# -- the tutorial's claims, as ordinary tests --------------------------------------------------------------
def test_first_layer_train_then_eval():
    config = BitQuantConfig(activation_dtype="int8", activation_granularity="per_tensor", weight_granularity="per_tensor")
    layer = BitLinear(in_features=512, out_features=256, bias=True, quant_config=config)
    x = torch.randn(32, 512)
    layer.train()
    assert layer(x).shape == (32, 256) and not hasattr(layer, "qweight")
    layer.eval()
    assert layer(x).shape == (32, 256)
    assert layer.qweight.dtype == torch.int8 and set(layer.qweight.unique().tolist()) <= {-1, 0, 1}
    layer.train()
    assert not hasattr(layer, "qweight")  # "removes quantized weights and scales"


@pytest.mark.parametrize("kwargs", [dict(weight_granularity="per_tensor"), dict(weight_granularity="per_channel"),
                                    dict(activation_dtype="float32"), dict(activation_dtype="int8"),
                                    dict(activation_granularity="per_channel", weight_granularity="per_channel")])
def test_configuration_options_build_working_layers(kwargs):
    layer = BitLinear(64, 32, quant_config=BitQuantConfig(**kwargs)).eval()
    assert layer(torch.randn(4, 64)).shape == (4, 32)
    n_scales = 32 if kwargs.get("weight_granularity") == "per_channel" else 1
    assert layer.weight_scale.numel() == n_scales


def test_converting_a_pytorch_model_by_hand():
    cfg = BitQuantConfig(activation_dtype="int8", activation_granularity="per_tensor", weight_granularity="per_tensor")
    model = nn.Sequential(BitLinear(784, 256, quant_config=cfg), nn.ReLU(), BitLinear(256, 10, quant_config=cfg))
    assert model(torch.randn(64, 784)).shape == (64, 10)


def test_auto_model_from_config():
    model = AutoBitModel.from_config(BitMLPConfig(n_layers=3, in_channels=256, hidden_dim=128, out_channels=10, dropout=0.1))
    assert model(torch.randn(1, 256)).shape == (1, 10)
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, BitLinear)]
    assert shapes == [(256, 128), (128, 128), (128, 10)]


def test_memory_comparison_reports_real_packed_bytes():
    cfg = BitQuantConfig(activation_dtype="int8", activation_granularity="per_tensor", weight_granularity="per_tensor")
    regular_memory = torch.nn.Linear(1000, 1000).weight.numel() * 4
    layer = BitLinear(1000, 1000, quant_config=cfg).eval()
    # 1000 rows x K padded to 1024 at 2 bits = 256,000 bytes, plus one fp32 scale
    assert layer.weight_memory_bytes == 1000 * 1024 // 4 + 4
    layer.deploy()
    assert layer.weight_memory_bytes == 256_004
    assert layer.packed_bytes() == 256_004 + 1000 * 4  # + the fp32 bias
    assert 0.93 < 1 - layer.weight_memory_bytes / regular_memory < 0.94  # not the 95.1% of numel*1.58/8


def test_deploy_is_permanent_and_uses_the_packed_op():
    layer = BitLinear(100, 50, quant_config=BitQuantConfig())
    x = torch.randn(8, 100)
    y_eval = layer.eval()(x)
    layer.deploy()
    assert layer.weight is None and "weight" not in dict(layer.named_parameters())
    assert layer.deployed.packed_weight.dtype == torch.uint8
    assert torch.equal(layer(x), y_eval)
    layer.train()  # a deployed layer stays quantized
    assert torch.equal(layer(x), y_eval)


def test_bad_config_values_raise_config_error():
    with pytest.raises(bfx.ConfigError, match="activation_dtype='int4'"):
        BitQuantConfig(activation_dtype="int4")
    with pytest.raises(bfx.ConfigError, match="weight_granularity='per_group'"):
        BitQuantConfig(weight_granularity="per_group")
    with pytest.raises(bfx.ConfigError, match="activation_granularity"):
        BitQuantConfig(activation_granularity="per_row")
    with pytest.raises(bfx.ConfigError, match="dropout"):
        BitMLPConfig(dropout=1.5)
    with pytest.raises(bfx.ConfigError, match="no model for a dict"):
        AutoBitModel.from_config({"n_layers": 2})
