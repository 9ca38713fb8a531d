"""Lone converted layers of a partially traced model (nn/single_linear_graph.py): one linear call, run directly
in eager CPU inference, and otherwise an ordinary GraphModule."""
import copy

import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.nn.single_linear_graph import SingleLinearGraph, single_linear_container
from bitlab_fx.ops.cpu import direct

_hf_tiny = pytest.importorskip("_hf_tiny")


@pytest.fixture(scope="module")
def llama():
    model, (ids,), _, _ = _hf_tiny.build("llama")
    cm = bfx.convert(bfx.prepare_qat(model.eval(), bfx.ternary()).eval())
    return cm, ids


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def test_lone_layers_become_direct_and_change_nothing(llama, monkeypatch):
    cm, ids = llama
    attn = cm.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, p), SingleLinearGraph) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert not isinstance(cm.model.layers[0].mlp, SingleLinearGraph)  # a traced graph of several layers
    fast = _logits(cm, ids)
    monkeypatch.setattr(direct, "_ENABLED", False)
    assert torch.equal(fast, _logits(cm, ids))


def test_hooks_and_copies(llama):
    cm, ids = llama
    want = _logits(cm, ids)
    seen = []
    handle = cm.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        assert torch.equal(_logits(cm, ids), want) and seen  # a hooked module takes the ordinary call
    finally:
        handle.remove()
    twin = copy.deepcopy(cm)
    assert isinstance(twin.model.layers[1].self_attn.v_proj, SingleLinearGraph)
    assert torch.equal(_logits(twin, ids), want)
    assert sorted(twin.state_dict()) == sorted(cm.state_dict())


def test_generate_and_summary_unchanged(llama):
    cm, ids = llama
    out = cm.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 4)
    rows = {r["layer"]: r for r in bfx.summary(cm).rows}
    assert rows["model.layers.0.self_attn.q_proj"]["weight"] == "ternary"


def test_only_a_graph_that_is_exactly_the_containers_call():
    torch.manual_seed(0)
    cm = bfx.convert(bfx.prepare_qat(torch.nn.Sequential(torch.nn.Linear(8, 8)), bfx.ternary()).eval())
    assert single_linear_container(cm) == "0"
    two = bfx.convert(bfx.prepare_qat(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()),
                                      bfx.ternary()).eval())
    assert single_linear_container(two) is None  # the ReLU is part of the computation
    (call,) = [n for n in cm.graph.nodes if "bitlab" in str(n.target)]
    call.update_arg(4, "per_tensor")  # no longer the container's own call
    cm.recompile()
    assert single_linear_container(cm) is None
