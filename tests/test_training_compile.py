"""``bfx.compile`` (``training_compile.py``): torch.compile for training prepared models on CPU, with the joint-graph
pass that recomputes bool masks in the backward instead of saving them."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.training_compile import RecomputeBoolTensors, inductor_options


def _relu_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))


def _saved_dtypes(model, x):
    """The dtypes of the tensors autograd keeps for the backward of ``model(x)`` (compiled graphs included)."""
    dtypes = []

    def pack(t):
        dtypes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, dtypes


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("train_kernel", ["fake_quant", "int8"])
def test_compiled_step_saves_no_masks_and_matches_eager(train_kernel):
    """The compiled prepared ReLU MLP (fullgraph) keeps no bool tensor for its backward, and its loss and gradients
    are the eager step's."""
    eager = bfx.prepare_qat(_relu_mlp(), dataclasses.replace(bfx.ternary(), train_kernel=train_kernel))
    compiled = bfx.compile(copy.deepcopy(eager), fullgraph=True)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    _, dtypes = _saved_dtypes(compiled.train(), x)
    assert dtypes and torch.bool not in dtypes, dtypes
    loss_e, grads_e = _loss_and_grads(eager.train(), x, y)
    loss_c, grads_c = _loss_and_grads(compiled, x, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_masks_are_not_drawn_again():
    """A random mask is recomputed from the saved draw, never from a new one: the gradient of the sum of a compiled
    dropout is the scale exactly where the output kept its input."""
    torch.manual_seed(1)
    compiled = bfx.compile(lambda x: F.dropout(x, 0.5, training=True) * 3.0, fullgraph=True)
    x = (torch.rand(64, 128) + 0.5).requires_grad_()  # no zeros: a zero output means dropped
    out = compiled(x)
    out.sum().backward()
    kept = out.detach() != 0
    assert 0.3 < kept.float().mean() < 0.7
    assert torch.equal(x.grad, kept.float() * 6.0)


def test_the_pass_tags_only_forward_bool_tensors():
    """On a joint graph: a bool the forward computes from a primal is tagged; one computed from an incoming gradient
    (the backward) and non-bool tensors are not."""
    from bitlab_fx.training_compile import _tag_forward_bool_tensors

    def joint(primals_1, tangents_1):
        forward_mask = primals_1 > 0
        backward_mask = tangents_1 > 0
        return torch.where(forward_mask, tangents_1, 0.0), backward_mask

    gm = torch.fx.symbolic_trace(joint)

    class Record(torch.fx.Interpreter):  # node.meta["val"], as AOTAutograd's joint graphs carry it
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    Record(gm).run(torch.randn(4), torch.randn(4))
    assert _tag_forward_bool_tensors(gm.graph) == 1
    tags = {n.name: n.meta.get("recompute") for n in gm.graph.nodes if n.op == "call_function"}
    assert tags == {"gt": torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE, "gt_1": None, "where": None}


def test_inductor_options_keep_the_callers_passes_and_modes():
    mine = RecomputeBoolTensors()
    other = object()
    merged = inductor_options({"joint_custom_pre_pass": other, "max_autotune": False})
    assert merged["max_autotune"] is False
    assert merged["joint_custom_pre_pass"][0] is other
    assert isinstance(merged["joint_custom_pre_pass"][1], RecomputeBoolTensors)
    assert inductor_options({"joint_custom_pre_pass": mine})["joint_custom_pre_pass"] is mine  # not added twice
    assert inductor_options(mode="max-autotune")["max_autotune"] is True
    assert isinstance(inductor_options()["joint_custom_pre_pass"], RecomputeBoolTensors)
    with pytest.raises(bfx.ConfigError, match="mode or options"):
        bfx.compile(nn.Linear(2, 2), mode="max-autotune", options={"max_autotune": True})


def test_another_backend_passes_through():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    compiled = bfx.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(compiled(x), model(x))
