"""The op schemas' argument checks (ops/_schema.py): bad input is a KernelError naming the op and the shape."""
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.quant.packing import pack_ternary


def _ternary(k=64, n=8):
    return pack_ternary(torch.zeros(n, k, dtype=torch.int8)), torch.ones(n)


@pytest.mark.parametrize("call, message", [
    (lambda p, s: torch.ops.bitlab.ternary_linear(torch.randn(2, 64), p.to(torch.int8), s), "must be uint8"),
    (lambda p, s: torch.ops.bitlab.ternary_linear(torch.randn(2, 63), p, s, None, "per_token", None, 64), "K=63"),
    (lambda p, s: torch.ops.bitlab.ternary_linear(torch.randn(2, 64), p, s, None, "per_token",
                                                   act_multiplier=torch.ones(2)), "act_multiplier must hold one number"),
    (lambda p, s: torch.ops.bitlab.ternary_linear(torch.randn(2, 64), p, s, None, "per_token",
                                                   torch.ones(2), 64), "act_multiplier must hold one number"),
    (lambda p, s: torch.ops.bitlab.ternary_linear(torch.randn(2, 64), p, s, None, "per_token", torch.ones(1),
                                                   act_multiplier=torch.ones(1)), "got both act_multiplier and act_scale"),
    (lambda p, s: torch.ops.bitlab.int8_linear(torch.randn(2, 64), torch.zeros(8, 64), s), "int8"),
    (lambda p, s: torch.ops.bitlab.int8_linear(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8),
                                                torch.ones(8, 5)), "do not divide K=64"),
])
def test_bad_arguments_are_kernel_errors_that_say_what(call, message):
    p, s = _ternary()
    with pytest.raises(bfx.KernelError, match=message):
        call(p, s)


def test_ops_pass_opcheck():
    p, s = _ternary()
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.bitlab.ternary_linear.default, (x, p, s, None, "per_token", None, 64))
    w8 = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    torch.library.opcheck(torch.ops.bitlab.int8_linear.default, (x, w8, s, None, "per_tensor", torch.tensor([3.0])))


# -- schema version 2: the static multiplier is ``act_multiplier``; ``act_scale`` is its old name ---------------
class _OldStyleStatic(torch.nn.Module):
    """A layer as graphs of schema version 1 call it: the static multiplier in the positional ``act_scale`` slot."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("packed", pack_ternary(torch.randint(-1, 2, (8, 64), dtype=torch.int8)))
        self.register_buffer("step", torch.full((8,), 0.5))
        self.register_buffer("multiplier", torch.tensor([4.0]))

    def forward(self, x):
        return torch.ops.bitlab.ternary_linear(x, self.packed, self.step, None, "per_tensor", self.multiplier, 64)


def test_old_positional_act_scale_means_the_same_multiplier():
    m, x = _OldStyleStatic(), torch.randn(3, 64)
    new = torch.ops.bitlab.ternary_linear(x, m.packed, m.step, None, "per_tensor", act_multiplier=m.multiplier)
    dynamic = torch.ops.bitlab.ternary_linear(x, m.packed, m.step, None, "per_tensor")
    assert torch.equal(m(x), new) and not torch.equal(new, dynamic)


def test_program_exported_with_the_old_argument_loads_static(tmp_path):
    """A .pt2 written by a schema-version-1 graph names the argument ``act_scale``: it must load with the same
    meaning (torch's loader drops argument names a schema no longer has, which would make the layer dynamic)."""
    m, x = _OldStyleStatic(), torch.randn(3, 64)
    path = tmp_path / "old.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(path))
    loaded = torch.export.load(str(path)).module()
    assert torch.equal(loaded(x), m(x))


def test_converted_static_layer_passes_act_multiplier_by_keyword(tmp_path):
    torch.manual_seed(0)
    cfg = bfx.QuantConfig(weight=bfx.TernaryWeight(), input=bfx.IntActivation(bits=8, dynamic=False,
                                                                               granularity="per_tensor"))
    pm = bfx.prepare_qat(torch.nn.Sequential(torch.nn.Linear(64, 8)), cfg)
    pm(torch.randn(16, 64))
    cm = bfx.convert(pm.eval())
    (node,) = [n for n in cm.graph.nodes if "bitlab" in str(n.target)]
    assert "act_multiplier" in node.kwargs and node.args[5] is None
    x = torch.randn(3, 64)
    path = tmp_path / "new.pt2"
    torch.export.save(torch.export.export(cm, (x,)), str(path))
    assert torch.equal(torch.export.load(str(path)).module()(x), cm(x))


def test_cuda_argument_binding_reads_both_names():
    from bitlab_fx.ops.cuda import _bind

    x, w, s, m = (torch.ones(1) * i for i in range(4))
    assert _bind("ternary_linear", (x, w, s, None, "per_tensor", None, 64), {"act_multiplier": m})[5] is m
    assert _bind("ternary_linear", (x, w, s, None, "per_tensor", m, 64), {})[5] is m
    assert _bind("int8_linear", (x, w, s, None, "per_tensor", None, m), {})[5] is m
    assert _bind("int8_linear", (x, w, s), {})[4:] == ("per_token", None, -1, None, 8, 0)
    assert _bind("int8_linear", (x, w, s), {"bias_codes": m})[7] is m
    assert _bind("ternary_linear", (x, w, s), {"act_bits": 4, "bias_bits": 8})[8:] == (4, 8)  # schema version 4


def test_ops_have_no_gradient_and_say_so_when_backpropagated():
    """The converted ops are inference ops (defined with torch.library, no Python autograd wrapper on every call):
    backpropagating through one warns, naming the op, and gives the input no gradient."""
    p, s = _ternary()
    x = torch.randn(3, 64, requires_grad=True)
    y = torch.ops.bitlab.ternary_linear(x, p, s)
    with pytest.warns(UserWarning, match="bitlab::ternary_linear: an autograd kernel was not registered"):
        y.sum().backward()
    assert x.grad is None
