"""passes/experts.py through prepare_qat / convert / summary: mapping rules name each 3-D weight, errors, summary rows."""
import warnings

import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.errors import ConfigError
from bitlab_fx.nn.experts import FakeQuantExperts, QuantizedExperts

from _moe_tiny import HIDDEN, RoutedMoE

X = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
MIXTRAL_EXPERTS = type(RoutedMoE().experts)


def _rows(model):
    return {r["layer"]: r for r in bfx.summary(model).rows}


def test_whole_traced_model_prepares_and_converts_its_experts():
    pm = bfx.prepare_qat(RoutedMoE(), bfx.ternary(), (X,))
    assert isinstance(pm, torch.fx.GraphModule) and isinstance(pm.experts, FakeQuantExperts)
    cm = bfx.convert(pm.eval())
    assert isinstance(cm.experts, QuantizedExperts)
    with torch.no_grad():
        assert torch.equal(cm(X), pm(X))
    rows = _rows(cm)
    assert rows["experts.gate_up_proj"]["weight"] == "ternary" and rows["experts.gate_up_proj"]["type"].endswith("4x96x32")
    assert rows["experts.down_proj"]["w_granularity"] == "per_channel per expert"
    assert "experts.gate_up_proj" not in bfx.summary(cm).float_weights


def test_rules_address_each_projection_by_name_pattern_ancestor_and_type():
    qc = (bfx.QConfigMapping().set_global(bfx.ternary())
          .set_module_name("experts.down_proj", bfx.int8()))
    rows = _rows(bfx.prepare_qat(RoutedMoE(), qc))
    assert (rows["experts.gate_up_proj"]["weight"], rows["experts.down_proj"]["weight"]) == ("ternary", "int8")
    assert rows["experts.down_proj"]["rule"] == "module_name('experts.down_proj')"
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name_regex(r".*experts\.gate_up_proj",
                                                                             bfx.weight_only("int4"))
    rows = _rows(bfx.prepare_qat(RoutedMoE(), qc))
    assert (rows["experts.gate_up_proj"]["weight"], rows["experts.gate_up_proj"]["activation"]) == ("int4", "float")
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(MIXTRAL_EXPERTS, bfx.int8())
    assert {r["weight"] for k, r in _rows(bfx.prepare_qat(RoutedMoE(), qc)).items() if "experts" in k} == {"int8"}


def test_experts_kept_float_by_a_rule_are_float_rows_and_count_in_the_share():
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("experts", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rule matched: no "matched no layer" warning
        pm = bfx.prepare_qat(RoutedMoE(), qc, (X,))
    assert not isinstance(pm.experts, FakeQuantExperts)
    s = bfx.summary(bfx.convert(pm.eval()))
    rows = {r["layer"]: r for r in s.rows}
    assert rows["experts.gate_up_proj"]["weight"] == "float" and rows["experts.gate_up_proj"]["rule"] == "module_name('experts')"
    linear = sum(r["params"] for r in s.rows if r["type"] == "Linear")
    experts = sum(p.numel() for p in pm.experts.parameters())
    assert s.totals["quantized_share"] == pytest.approx(linear / (linear + experts))


@pytest.mark.parametrize("config, match", [
    (bfx.QuantConfig(weight="ternary", input=bfx.IntActivation(4)), "not supported for experts"),
    (bfx.QuantConfig(weight="int8", input="int8", output=bfx.IntActivation(8)), "no bias=, output="),
    (bfx.ternary(weight_granularity=bfx.PerGroup(64)), "group size 64 does not divide"),
])
def test_configs_experts_cannot_take_raise_naming_the_weight(config, match):
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("experts", config)
    with pytest.raises(ConfigError, match=match) as e:
        bfx.prepare_qat(RoutedMoE(), qc)
    assert "experts.gate_up_proj" in str(e.value) and "module_name('experts')" in str(e.value)


def test_export_frontend_refuses_quantized_experts():
    with pytest.raises(ConfigError, match="only the fx frontend supports"):
        bfx.prepare_qat(RoutedMoE(), bfx.ternary(), (X,), frontend="export")


def test_calibrated_static_inputs_and_save_load(tmp_path):
    pytest.importorskip("safetensors")
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name(
        "experts", bfx.QuantConfig(weight="int4", input=bfx.IntActivation(8, dynamic=False, granularity="per_tensor")))
    pm = bfx.prepare_qat(RoutedMoE(), qc).eval()
    with torch.no_grad(), bfx.calibrate(pm):
        pm(X)
    cm = bfx.convert(pm)
    assert _rows(cm)["experts.down_proj"]["activation"] == "int8 per_tensor (fused)"
    path = str(tmp_path / "moe.safetensors")
    bfx.save_quantized(cm, path)
    with warnings.catch_warnings():  # rebuilt before the file's multipliers load: "never saw data" does not apply
        warnings.simplefilter("ignore", UserWarning)
        loaded = bfx.load_quantized(RoutedMoE(), path)
    with torch.no_grad():
        assert torch.equal(loaded(X), cm(X)) and torch.equal(cm(X), pm(X))


def test_expert_parallel_experts_stay_float_with_the_reason():
    model = RoutedMoE()
    model.experts._is_expert_parallel = True
    pm = bfx.prepare_qat(model, bfx.ternary(), (X,))
    assert not isinstance(pm.experts, FakeQuantExperts)
    s = bfx.summary(pm)
    assert "expert-parallel" in s.skipped["experts"]
    assert {r["weight"] for r in s.rows if r["layer"].startswith("experts.")} == {"float"}
