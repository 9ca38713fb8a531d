"""Eager CPU inference without the dispatcher (ops/cpu/direct.py): the same kernel on the same arguments,
and only where nothing else (autograd, a mode, a tracer, torch.compile) would see the op call."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bitlab_fx as bfx
from bitlab_fx.ops.cpu import direct

CONFIGS = {
    "ternary": lambda: bfx.ternary(),
    "int8": lambda: bfx.QuantConfig(weight=bfx.IntWeight(8), input="int8"),
    "int4-group": lambda: bfx.QuantConfig(weight=bfx.IntWeight(4, granularity="per_group:32"), input="int8"),
    "ternary-weight-only": lambda: bfx.weight_only(bfx.TernaryWeight()),
    "ternary-static": lambda: bfx.QuantConfig(weight=bfx.TernaryWeight(), input=bfx.IntActivation(
        bits=8, dynamic=False, granularity="per_tensor")),
}


@pytest.fixture(autouse=True)
def python_kernels(monkeypatch):
    """The direct path serves where the C++ dispatcher kernels are not installed (no C++ compiler): test it so."""
    monkeypatch.setattr(direct, "_cxx_installed", lambda: False)


def test_off_once_the_cpp_kernels_run_the_ops(monkeypatch):
    monkeypatch.setattr(direct, "_cxx_installed", lambda: True)
    assert not direct.eligible(torch.randn(2, 8))


def _container(name, k=96, n=40):
    torch.manual_seed(0)
    pm = bfx.prepare_qat(torch.nn.Sequential(torch.nn.Linear(k, n)), CONFIGS[name]())
    pm(torch.randn(32, k))  # calibrates a static multiplier
    cm = bfx.convert(pm.eval())
    return cm, cm.get_submodule("0")


class _SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (2, 5, 96), (96,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_call_equals_the_op_bitwise(name, shape, dtype):
    cm, layer = _container(name)
    x = torch.randn(shape).to(dtype)
    assert direct.eligible(x)
    y = layer(x)
    with _SeenOps() as seen:  # a dispatch mode makes the layer go through the op
        want = layer(x)
    assert any("bitlab" in op for op in seen.ops)
    assert y.dtype == want.dtype == dtype and y.shape == want.shape and torch.equal(y, want)
    assert torch.equal(cm(x), y)


def test_not_eligible_where_something_else_must_see_the_op():
    x = torch.randn(2, 8)
    assert direct.eligible(x)
    assert not direct.eligible(torch.randn(2, 8, requires_grad=True))
    with torch.no_grad():
        assert direct.eligible(torch.randn(2, 8, requires_grad=True))
    assert not direct.eligible(torch.nn.Parameter(x))  # a subclass
    with _SeenOps():
        assert not direct.eligible(x)
    assert not direct.eligible(torch.empty(2, 8, device="meta"))


def test_declines_what_the_op_must_reject_or_compute_otherwise():
    _, layer = _container("ternary")
    args = (layer.packed_weight, layer.weight_scale, layer.bias, layer.act, None, layer.in_features)
    assert direct.linear("ternary", torch.randn(2, 95), *args) is None  # wrong K: the op raises its error
    assert direct.linear("ternary", torch.randn(2, 96, dtype=torch.float64), *args) is None  # dtype the op rejects
    with pytest.raises(bfx.BitlabError, match="K=95"):
        layer(torch.randn(2, 95))
    with pytest.raises(bfx.BitlabError, match="float64"):
        layer(torch.randn(2, 96, dtype=torch.float64))


def test_compile_and_export_still_see_the_op():
    _, layer = _container("ternary")
    x = torch.randn(2, 96)
    ep = torch.export.export(layer, (x,), strict=False)
    assert any("bitlab" in str(n.target) for n in ep.graph.nodes)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setattr(direct, "_ENABLED", False)
    assert not direct.eligible(torch.randn(2, 8))
