"""Converted graphs calling their linear kernels directly in eager CPU inference (nn/direct_graph.py): the same
results, and the graph, code, copies, hooks, tracers and compilers unchanged."""
import copy
import pickle

import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.nn.direct_graph import DirectCallGraph
from bitlab_fx.ops.cpu import direct

from _helpers import mlp

_hf_tiny = pytest.importorskip("_hf_tiny")


@pytest.fixture(autouse=True)
def python_kernels(monkeypatch):
    """The direct path serves where the C++ dispatcher kernels are not installed (no C++ compiler): test it so."""
    monkeypatch.setattr(direct, "_cxx_installed", lambda: False)


@pytest.fixture(scope="module")
def llama():
    model, (ids,), _, _ = _hf_tiny.build("llama")
    cm = bfx.convert(bfx.prepare_qat(model.eval(), bfx.ternary()).eval())
    return cm, ids


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def _converted_mlp():
    torch.manual_seed(0)
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("2", bfx.int8())
    return bfx.convert(bfx.prepare_qat(mlp(), qc).eval())


def test_every_converted_part_is_direct_and_changes_nothing(llama, monkeypatch):
    cm, ids = llama
    layer = cm.model.layers[0]
    parts = [layer.mlp] + [getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert all(isinstance(p, DirectCallGraph) for p in parts)
    fast = _logits(cm, ids)
    monkeypatch.setattr(direct, "_ENABLED", False)
    assert torch.equal(fast, _logits(cm, ids))


def test_graph_code_and_print_still_show_the_ops():
    cm = _converted_mlp()
    assert type(cm).__name__ == "GraphModule" and isinstance(cm, DirectCallGraph)
    assert "torch.ops.bitlab.ternary_linear.default" in cm.code
    assert "call_linear_op" not in cm.code
    assert sum("bitlab" in str(n.target) for n in cm.graph.nodes) == 2


def test_direct_forward_equals_the_ops_forward_in_every_mode(monkeypatch):
    cm = _converted_mlp()
    inputs = [torch.randn(3, 32), torch.randn(1, 32), torch.randn(2, 4, 32), torch.randn(3, 32).bfloat16()]
    with torch.no_grad():
        fast = [cm(x) for x in inputs]
    monkeypatch.setattr(direct, "_ENABLED", False)
    with torch.no_grad():
        assert all(torch.equal(f, cm(x)) for f, x in zip(fast, inputs))


def test_hooks_copies_and_pickles(llama):
    cm, ids = llama
    want = _logits(cm, ids)
    seen = []
    handle = cm.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        assert torch.equal(_logits(cm, ids), want) and seen
    finally:
        handle.remove()
    twin = copy.deepcopy(cm)
    assert isinstance(twin.model.layers[1].self_attn.v_proj, DirectCallGraph)
    assert torch.equal(_logits(twin, ids), want)
    assert sorted(twin.state_dict()) == sorted(cm.state_dict())
    assert torch.equal(_logits(pickle.loads(pickle.dumps(cm)), ids), want)  # a plain GraphModule again: same result


def test_tracers_and_compilers_see_the_ops():
    cm = _converted_mlp()
    x = torch.randn(2, 32)
    ep = torch.export.export(cm, (x,), strict=False)
    assert sum("bitlab" in str(n.target) for n in ep.graph.nodes) == 2
    retraced = torch.fx.symbolic_trace(cm)
    assert sum("bitlab" in str(n.target) for n in retraced.graph.nodes) == 2
    compiled = torch.compile(cm, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), cm(x))


def test_graph_edits_are_picked_up():
    cm = _converted_mlp()
    x = torch.randn(2, 32)
    (first, _) = [n for n in cm.graph.nodes if "bitlab" in str(n.target)]
    first.update_arg(4, "per_tensor")  # now a different computation
    cm.recompile()
    assert torch.equal(cm(x), torch.fx.GraphModule(cm, cm.graph)(x))


def test_generate_and_summary_unchanged(llama):
    cm, ids = llama
    out = cm.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 4)
    rows = {r["layer"]: r for r in bfx.summary(cm).rows}
    assert rows["model.layers.0.self_attn.q_proj"]["weight"] == "ternary"


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gpt2"])
def test_other_decoders_give_the_same_logits_direct_or_not(name, monkeypatch):
    model, (ids,), _, _ = _hf_tiny.build(name)
    cm = bfx.convert(bfx.prepare_qat(model.eval(), bfx.ternary()).eval())
    fast = _logits(cm, ids)
    monkeypatch.setattr(direct, "_ENABLED", False)
    assert torch.equal(fast, _logits(cm, ids))
