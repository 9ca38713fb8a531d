"""Converted containers (QuantizedLinear/Conv1d/Conv2d): one op call, the graph's and forward's."""
import pytest
import torch
from torch import fx, nn

import bitlab_fx as bfx
from bitlab_fx.nn.quantized import _QuantizedBase, upgrade_legacy_keys
from bitlab_fx.passes._common import META
from _helpers import TiedLinear

WEIGHTS = {"ternary": bfx.TernaryWeight(), "int4": bfx.IntWeight(4), "int8": bfx.IntWeight(8),
           "int4-group": bfx.IntWeight(4, bfx.PerGroup(16))}
ACTS = {"per_token": bfx.IntActivation(), "per_tensor": bfx.IntActivation(granularity="per_tensor"),
        "static": bfx.IntActivation(dynamic=False, granularity="per_tensor"), "none": None}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))  # [B, 8, 16]
        h = torch.relu(self.c2(h.reshape(h.shape[0], 8, 4, 4)))
        return self.head(torch.relu(self.fc(h.flatten(1))))


def _layer_inputs(cm: fx.GraphModule, x):
    """The input each converted layer op receives, recorded by running the graph node by node."""
    seen = {}
    interp = fx.Interpreter(cm)
    run_node = interp.run_node

    def record(n):
        out = run_node(n)
        if META in n.meta and n.meta[META].container is not None:
            seen[n.meta[META].container] = (interp.env[n.args[1]] if n.args and isinstance(n.args[0], str)
                                            else interp.env[n.args[0]], out)
        return out

    interp.run_node = record
    interp.run(x)
    return seen


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("weight", WEIGHTS)
def test_every_container_called_directly_equals_its_graph_node(weight, act):
    torch.manual_seed(0)
    spec = WEIGHTS[weight]
    qc = bfx.QConfigMapping().set_global(bfx.QuantConfig(weight=spec, input=ACTS[act]))
    if weight == "int4-group":  # per-group weights are for linear layers
        qc = qc.set_object_type(nn.Conv1d, bfx.QuantConfig(weight=bfx.IntWeight(4), input=ACTS[act]))
        qc = qc.set_object_type(nn.Conv2d, bfx.QuantConfig(weight=bfx.IntWeight(4), input=ACTS[act]))
    pm = bfx.prepare_qat(_Net(), qc)
    x = torch.randn(6, 4, 16)
    pm.train()(x)  # static scales observe once
    cm = bfx.convert(pm.eval())
    seen = _layer_inputs(cm, x)
    assert set(seen) == {"c1", "c2", "fc", "head"}
    for path, (layer_input, graph_out) in seen.items():
        layer = cm.get_submodule(path)
        assert isinstance(layer, _QuantizedBase)
        assert (layer.act_multiplier is not None) == (act == "static"), path
        assert torch.equal(layer(layer_input), graph_out), path


def test_shared_weight_behind_two_static_quantizers_gets_a_multiplier_per_call():
    static = bfx.QuantConfig(weight="ternary", input=bfx.IntActivation(dynamic=False, granularity="per_tensor"))
    pm = bfx.prepare_qat(TiedLinear(), static)
    pm.train()(torch.randn(16, 8) * 4)
    cm = bfx.convert(pm.eval())
    reads = sorted(n.target for n in cm.graph.nodes if n.op == "get_attr" and "act_multiplier" in n.target)
    assert reads == ["fc.act_multiplier", "fc.act_multiplier_1"]
    x = torch.randn(5, 8)
    assert torch.equal(cm(x), pm(x))


def test_state_dicts_with_the_old_static_scale_key_still_load():
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(8, 4)),
                         bfx.QuantConfig(weight="ternary", input=bfx.IntActivation(dynamic=False, granularity="per_tensor")))
    pm.train()(torch.randn(4, 8))
    cm = bfx.convert(pm.eval())
    state = cm.state_dict()
    old = {("0.act_scale_static" if k == "0.act_multiplier" else k): v.clone() if torch.is_tensor(v) else v
           for k, v in state.items()}  # how files written before the rename name it
    with torch.no_grad():
        cm.get_submodule("0").act_multiplier.mul_(2)
    cm.load_state_dict(old)
    assert torch.equal(cm.get_submodule("0").act_multiplier, state["0.act_multiplier"])
    keys = {"a.act_scale_static": 1, "b.act_multiplier": 2, "b.act_scale_static": 3}
    upgrade_legacy_keys(keys, "a.")
    upgrade_legacy_keys(keys, "b.")  # the new key wins; the old one is left for strict loading to report
    assert keys == {"a.act_multiplier": 1, "b.act_multiplier": 2, "b.act_scale_static": 3}
