"""Output quantizers on non-layer nodes (Brevitas' QuantReLU / QuantIdentity): which rules reach which nodes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx
from _helpers import LeNet, mlp

ACT4 = dict(bits=4, dynamic=False, granularity="per_tensor")


def _fq_names(gm, kind):
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ == kind]


@pytest.mark.parametrize("spelling", ["module", "F.relu", "torch.relu", "method"])
@pytest.mark.parametrize("rule_type", [nn.ReLU, F.relu])
def test_relu_rules_match_every_spelling_of_relu(spelling, rule_type):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(8, 8), nn.ReLU()

        def forward(self, x):
            h = self.fc(x)
            h = {"module": self.act, "F.relu": F.relu, "torch.relu": torch.relu, "method": lambda t: t.relu()}[spelling](h)
            return h * 2

    qc = bfx.QConfigMapping().set_object_type(rule_type, bfx.QuantConfig(output=bfx.IntActivation(signed=False, **ACT4)))
    pm = bfx.prepare_qat(Net(), qc)
    assert len(_fq_names(pm, "ActivationFakeQuant")) == 1
    pm(torch.randn(64, 8))
    y = pm.eval()(torch.randn(5, 8)) / 2
    levels = y * pm.get_submodule(_fq_names(pm, "ActivationFakeQuant")[0]).multiplier(torch.empty(0))
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.min() >= 0 and levels.max() <= 15


def test_global_config_with_output_quantizes_layers_not_every_op():
    cfg = bfx.QuantConfig(weight="int4", output=bfx.IntActivation(signed=True, **ACT4))
    pm = bfx.prepare_qat(mlp((8, 16, 4)), cfg)
    assert _fq_names(pm, "ActivationFakeQuant") == ["0_output_fq", "2_output_fq"]  # the two Linears, not the ReLU


def test_quant_identity_equivalent_and_module_name_output_rule():
    model = nn.Sequential(nn.Identity(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    qc = (bfx.QConfigMapping().set_global(bfx.weight_only("int4"))
          .set_object_type(nn.Identity, bfx.QuantConfig(output=bfx.IntActivation(bits=4, dynamic=False, granularity="per_tensor")))
          .set_module_name("2", bfx.QuantConfig(output="uint4")))
    pm = bfx.prepare_qat(model, qc)
    assert _fq_names(pm, "ActivationFakeQuant") == ["0_output_fq", "2_output_fq"]
    pm(torch.randn(32, 8))
    cm = bfx.convert(pm.eval())
    x = torch.randn(6, 8)
    torch.testing.assert_close(cm(x), pm(x), rtol=1e-4, atol=1e-5)


def test_non_layer_rule_without_output_is_a_clear_error():
    with pytest.raises(bfx.ConfigError, match=r"not a linear/conv layer.*QuantConfig\(output="):
        bfx.prepare_qat(mlp(), bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(nn.ReLU, bfx.ternary()))


def test_none_rule_for_one_relu_is_used_and_does_not_warn():
    import warnings
    out = bfx.QuantConfig(output=bfx.IntActivation(signed=False, **ACT4))
    qc = (bfx.QConfigMapping().set_global(bfx.int8()).set_object_type(nn.ReLU, out)
          .set_module_name("relu2", None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: "rule module_name('relu2') matched no layer"
        pm = bfx.prepare_qat(LeNet(), qc)
    assert hasattr(pm, "relu1_output_fq") and not hasattr(pm, "relu2_output_fq")
