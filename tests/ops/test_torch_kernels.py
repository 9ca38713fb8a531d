"""The C++ dispatcher kernels of the CPU linear ops (ops/cpu/torch_kernels.py/.cpp): installed where a C++
compiler exists, bitwise the Python kernels (``bitlab::_py_<op>``) on the cases they run, and every other case
handed to the Python kernels (their results and their errors)."""
import os
import shutil

import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.ops import cpu, reference
from bitlab_fx.ops.cpu import torch_kernels
from bitlab_fx.quant.packing import pack_int4, pack_ternary

K, N = 200, 24


def _weights(fmt):
    torch.manual_seed(0)
    if fmt == "ternary":
        return pack_ternary(torch.randint(-1, 2, (N, K), dtype=torch.int8))
    if fmt == "int4":
        return pack_int4(torch.randint(-7, 8, (N, K), dtype=torch.int8))
    return torch.randint(-127, 128, (N, K), dtype=torch.int8)


def _call(name, fmt, x, w, ws, bias, act, static=None, by_keyword=True):
    op = getattr(torch.ops.bitlab, f"{name}{fmt}_linear").default
    tail = (K,) if fmt != "int8" else ()
    if static is None or not by_keyword:
        return op(x, w, ws, bias, act, static, *tail)
    return op(x, w, ws, bias, act, None, *tail, act_multiplier=static)


def test_installed_where_a_cpp_compiler_exists():
    torch.ops.bitlab.ternary_linear(torch.randn(1, K), _weights("ternary"), torch.ones(N))  # first use builds
    if os.environ.get("BITLAB_FX_TORCH_KERNELS") == "0":
        assert "switched off by BITLAB_FX_TORCH_KERNELS=0" in torch_kernels.status()
    elif any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        assert torch_kernels.status() == "C++" and torch_kernels.installed()
    else:
        assert "no C++ compiler" in torch_kernels.status()


@pytest.mark.parametrize("fmt", ["ternary", "int8", "int4"])
@pytest.mark.parametrize("act, static, by_keyword", [("per_token", None, True), ("per_tensor", None, True),
                                                       ("per_tensor", 3.0, True), ("per_token", 3.0, False)])
@pytest.mark.parametrize("shape", [(1, K), (5, K), (2, 3, K), (K,)])
@pytest.mark.parametrize("scale", ["channel", "tensor"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_same_as_the_python_kernel_bitwise(fmt, act, static, by_keyword, shape, scale, with_bias):
    w = _weights(fmt)
    ws = torch.rand(N) + 0.5 if scale == "channel" else torch.tensor([0.7])
    bias = torch.randn(N) if with_bias else None
    multiplier = None if static is None else torch.tensor([static])
    x = torch.randn(shape)
    got = _call("", fmt, x, w, ws, bias, act, multiplier, by_keyword)
    want = _call("_py_", fmt, x, w, ws, bias, act, multiplier, by_keyword)
    assert got.shape == want.shape == (*shape[:-1], N) and torch.equal(got, want)


@pytest.mark.parametrize("fmt", ["ternary", "int8", "int4"])
@pytest.mark.parametrize("group", [32, 64, 128, 40])
@pytest.mark.parametrize("rows", [1, 5])
def test_per_group_scales_same_as_the_python_kernel_bitwise(fmt, group, rows):
    """Per-group scales [N, G] run in C++ too (M = 1: the decode loops), with the Python kernel's results; ternary
    groups that are not whole 32-k runs (40) go to the Python kernel, which runs the reference."""
    k = 640
    torch.manual_seed(group + rows)
    q = {"ternary": 1, "int8": 127, "int4": 8}[fmt]
    wq = torch.randint(-q, q + (fmt != "int4"), (N, k), dtype=torch.int8)
    w = {"ternary": pack_ternary, "int4": pack_int4, "int8": lambda t: t}[fmt](wq)
    ws, bias, x = torch.rand(N, k // group) + 0.5, torch.randn(N), torch.randn(rows, k)
    tail = () if fmt == "int8" else (k,)
    got = getattr(torch.ops.bitlab, f"{fmt}_linear")(x, w, ws, bias, "per_token", None, *tail)
    want = getattr(torch.ops.bitlab, f"_py_{fmt}_linear")(x, w, ws, bias, "per_token", None, *tail)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["bf16", "non-contiguous", "groups not dividing K", "weight-only", "disabled"])
def test_other_cases_are_the_python_kernels(case, monkeypatch):
    w, ws, x = _weights("int8"), torch.rand(N) + 0.5, torch.randn(4, K)
    act = "per_token"
    if case == "bf16":
        x = x.bfloat16()
    elif case == "non-contiguous":
        x = torch.randn(K, 4).t()
    elif case == "groups not dividing K":  # the Python kernel's error
        with pytest.raises(bfx.KernelError, match="groups do not divide"):
            _call("", "int8", x, w, torch.rand(N, 3), None, act)
        return
    elif case == "weight-only":
        act = "none"
    elif case == "disabled":
        monkeypatch.setenv("BITLAB_FX_DISABLE_CPU_KERNEL", "1")
        assert torch.equal(_call("", "int8", x, w, ws, None, act), reference.int8_linear(x, w, ws, None, act, None))
        return
    assert torch.equal(_call("", "int8", x, w, ws, None, act), _call("_py_", "int8", x, w, ws, None, act))


def test_bad_input_raises_the_python_kernels_errors():
    w = _weights("ternary")
    with pytest.raises(bfx.KernelError, match="K=199"):
        torch.ops.bitlab.ternary_linear(torch.randn(2, K - 1), w, torch.ones(N), None, "per_token", None, K)
    with pytest.raises(bfx.KernelError, match="got both act_multiplier and act_scale"):
        torch.ops.bitlab.ternary_linear(torch.randn(2, K), w, torch.ones(N), None, "per_tensor", torch.ones(1), K,
                                        act_multiplier=torch.ones(1))
    with pytest.raises(bfx.KernelError, match="act='tokens'"):
        torch.ops.bitlab.ternary_linear(torch.randn(2, K), w, torch.ones(N), None, "tokens")


def test_converted_model_runs_them_and_agrees_with_the_prepared_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    pm = bfx.prepare_qat(model, bfx.ternary()).eval()
    cm = bfx.convert(pm)
    x = torch.randn(3, K)
    with torch.no_grad():
        assert torch.equal(cm(x), pm(x))
    assert cpu.kernel_library() is not None
