"""Where a layer's input scale comes from: an upstream quantizer through scale-preserving ops, or the op that
breaks the chain (an IntBias without input= then raises at prepare, naming the layer and that op)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.passes.input_scale import trace_scale

STATIC = {"dynamic": False, "granularity": "per_tensor"}
W3_B8 = bfx.QuantConfig(weight=bfx.IntWeight(3), bias=bfx.IntBias(8))  # no input=: the step comes from upstream


class Head(nn.Module):
    """``conv -> ReLU (quantized) -> between(...) -> fc``: ``between`` is the op under test."""

    def __init__(self, between, features=4 * 4 * 4):
        super().__init__()
        self.conv, self.relu, self.between = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), between
        self.fc = nn.Linear(features, 5)

    def forward(self, x):
        return self.fc(self.between(self.relu(self.conv(x))).flatten(1))


def _mapping():
    return (bfx.QConfigMapping().set_global(W3_B8)
            .set_module_name("conv", bfx.QuantConfig(weight=bfx.IntWeight(3), input=bfx.IntActivation(4, **STATIC)))
            .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(4, signed=False, **STATIC))))


def _input_scales(pm):
    return {n.meta["bitlab"].fqn: n.meta["bitlab"].input_scale for n in pm.graph.nodes if "bitlab" in n.meta}


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("between, features, via", [
    (nn.MaxPool2d(2), 16, "'relu' via between, flatten"),  # a module: named by its path
    (Lambda(lambda x: F.max_pool2d(x, 2)), 16, "'relu' via max_pool2d, flatten"),
    (Lambda(lambda x: F.avg_pool2d(x, 1)), 64, "'relu' via avg_pool2d, flatten"),  # one-element window: exact
    (Lambda(lambda x: F.pad(x, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]), 64, "'relu' via pad, getitem, flatten"),
    (nn.ZeroPad2d(0), 64, "'relu' via between, flatten"),
    (Lambda(lambda x: F.dropout(x.permute(0, 1, 3, 2), 0.1)), 64, "'relu' via permute, dropout, flatten"),
    (Lambda(lambda x: torch.cat([x, F.max_pool2d(x, 1)], 1)), 128, "'relu' via cat, flatten"),  # one quantizer
])
def test_scale_preserving_ops_carry_the_upstream_step(between, features, via):
    pm = bfx.prepare_qat(Head(between, features), _mapping())
    scales = _input_scales(pm)
    assert scales == {"conv": "own input=static", "fc": via}
    assert pm.fc_bias_fq.input_fq is pm.relu_output_fq  # the IntBias step is relu's step times the weight step
    assert not hasattr(pm, "fc_input_fq")


@pytest.mark.parametrize("between, features, breaker", [
    (nn.AvgPool2d(2), 16, r"'between' \(AvgPool2d\): it averages a window of 2 values"),
    (Lambda(lambda x: F.avg_pool2d(x, 2)), 16, r"'avg_pool2d' \(node 'avg_pool2d'\): it averages a window of 2"),
    (Lambda(lambda x: F.pad(x, (1, 1, 1, 1), value=1.0)), 144, r"'pad'.*only zero padding keeps the grid"),
    (Lambda(lambda x: x + 1), 64, r"'add' \(node 'add'\), which does not keep values on a quantizer's grid"),
    (nn.BatchNorm2d(4), 64, r"'between' \(BatchNorm2d\)"),
])
def test_an_op_off_the_grid_breaks_the_chain_and_is_named(between, features, breaker):
    with pytest.raises(bfx.ConfigError, match=r"layer 'fc' \(Linear, matched by rule \"global\"\): IntBias\(bits=8\) "
                                              r"needs the step of a quantized input.*chain breaks at " + breaker):
        bfx.prepare_qat(Head(between, features), _mapping())


def test_concatenating_two_quantizers_breaks_the_chain():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.ReLU(), nn.ReLU(), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(torch.cat([self.a(x), self.b(-x)], 1))

    qc = (bfx.QConfigMapping().set_global(W3_B8)
          .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(4, signed=False, **STATIC))))
    with pytest.raises(bfx.ConfigError, match=r"'cat'.*different quantizers \(a_output_fq, b_output_fq\)"):
        bfx.prepare_qat(TwoBranches(), qc)


def test_model_input_without_quantizer_names_the_input_and_the_fix():
    with pytest.raises(bfx.ConfigError, match=r"layer '0'.*chain breaks at the model input 'input\w*'\. Give the layer "
                                              r"its own input=IntActivation\(bits, dynamic=False"):
        bfx.prepare_qat(nn.Sequential(nn.Linear(8, 4)), W3_B8)


def test_layer_without_bias_needs_no_input_scale():
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(8, 4, bias=False)), W3_B8)
    assert _input_scales(pm) == {"0": "float"}


def test_dynamic_upstream_quantizer_gives_a_bias_step_per_token():
    """A dynamic (default) uint4 ReLU: the next layer quantizes its input again per its own tokens, on that range, and
    its IntBias step is one per token (the converted op does the same at run time)."""
    qc = (bfx.QConfigMapping().set_global(W3_B8)
          .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(4, signed=False))))  # dynamic default
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4)), qc)
    assert pm.get_submodule("2_bias_fq").per_token and pm.get_submodule("2_bias_fq").input_fq.layer == "1"
    assert _input_scales(pm)["2"] == "'1' (dynamic: re-quantized per layer token), bias step per token"


def test_dynamic_upstream_quantizer_whose_codes_do_not_fit_int8_is_rejected_with_the_static_spelling():
    qc = (bfx.QConfigMapping().set_global(W3_B8)
          .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(8, signed=False))))  # dynamic default
    with pytest.raises(bfx.ConfigError, match=r"layer '2'.*the quantizer of '1' \(uint8\) is dynamic per_token.*"
                                              r"uint8 codes do not fit int8.*"
                                              r"IntActivation\(bits, dynamic=False, granularity='per_tensor'\)"):
        bfx.prepare_qat(nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4)), qc)


def test_trace_scale_reports_the_path_in_graph_order():
    pm = bfx.prepare_qat(Head(nn.MaxPool2d(2), 16), _mapping())
    fc = next(n for n in pm.graph.nodes if "bitlab" in n.meta and n.meta["bitlab"].fqn == "fc")
    source = trace_scale(pm, fc.args[0])
    assert source.node.target == "relu_output_fq" and source.via == ("between", "flatten") and source.layer == "relu"


def test_summary_has_an_input_scale_column():
    pm = bfx.prepare_qat(Head(nn.MaxPool2d(2), 64), _mapping())
    pm(torch.randn(2, 1, 8, 8))
    for model in (pm, bfx.convert(pm.eval())):
        s = bfx.summary(model)
        assert [r["input_scale"] for r in s.rows] == ["own input=static", "'relu' via between, flatten"]
        assert "input_scale" in str(s).splitlines()[1]
