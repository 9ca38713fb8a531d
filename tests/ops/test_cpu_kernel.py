"""The C CPU kernel (bitlab_fx/ops/cpu) against reference.py.

The integer part is exact and the kernel rescales in the reference's fp32 order
(``(float)acc * ws / s + bias``, per group ``sum_g (float)acc_g * ws_g`` left to right, then ``/ s``;
``bitlab_fx.quant.arithmetic``), built with -ffp-contract=off, so outputs are compared bitwise, per-group
scales included.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import bitlab_fx  # noqa: F401  (defines torch.ops.bitlab)
from bitlab_fx.ops import cpu, reference
from bitlab_fx.quant.packing import pack_int4, pack_ternary

from _kernel_paths import LIB  # (the isa fixture of every kernel path: tests/ops/conftest.py)

needs_kernel = pytest.mark.skipif(LIB is None, reason="CPU kernel could not be built here")


def _weights(n, k, kind, g=None, gen=None):
    wq = torch.randint(-1, 2, (n, k), generator=gen)
    if kind == "tensor":
        ws = torch.rand(1, generator=gen) + 0.01
    elif kind == "channel":
        ws = torch.rand(n, generator=gen) + 0.01
    else:
        ws = torch.rand(n, g, generator=gen) + 0.01
    return wq, ws


_ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _assert_same(y, r):
    assert y.dtype == r.dtype and y.shape == r.shape
    assert torch.equal(y, r), f"max abs diff {(y.float() - r.float()).abs().max().item()}"


def _both(x, wq, ws, bias, act, act_scale):
    """(kernel, reference) for ternary and for int8 weights."""
    p = pack_ternary(wq)
    w8 = (wq * torch.randint(1, 128, wq.shape)).to(torch.int8)
    return [
        (torch.ops.bitlab.ternary_linear(x, p, ws, bias, act, act_scale),
         reference.ternary_linear(x, p, ws, bias, act, act_scale)),
        (torch.ops.bitlab.int8_linear(x, w8, ws, bias, act, act_scale),
         reference.int8_linear(x, w8, ws, bias, act, act_scale)),
    ]


@needs_kernel
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(0, 64), kb=st.integers(1, 3), kr=st.sampled_from([0, 1, 31, 32, 77, 96]),
       n=st.integers(0, 16).map(lambda v: 2 * v + 1), scale=st.sampled_from(["tensor", "channel", "group"]),
       has_bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       act=st.sampled_from(["per_token", "per_tensor", "static"]), seed=st.integers(0, 2**16))
def test_linear_matches_reference_bitwise(isa, m, kb, kr, n, scale, has_bias, dtype, act, seed):
    k = max(32, (kb - 1) * 128 + kr) if scale == "group" else (kb - 1) * 128 + kr or 5
    gen = torch.Generator().manual_seed(seed)
    groups = k // 32 if scale == "group" else None
    if scale == "group" and k % 32:
        k = k // 32 * 32
        groups = k // 32
    wq, ws = _weights(n, k, scale, groups, gen)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    act_scale = torch.tensor([2.5]) if act == "static" else None
    for y, r in _both(x, wq, ws, bias, "per_token" if act == "static" else act, act_scale):
        _assert_same(y, r)  # int8 weights reach 127


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 4096, 300), (70, 1100, 259), (5, 640, 1025)])
def test_multithreaded_shapes(isa, m, k, n):
    """Shapes big enough that the kernel splits the output over threads (and M=1 decode tiling)."""
    torch.manual_seed(m + k + n)
    for scale, g in (("channel", None), ("tensor", None), ("group", k // 128 if k % 128 == 0 else 1)):
        wq, ws = _weights(n, k, scale, g)
        x = torch.randn(m, k)
        for y, r in _both(x, wq, ws, torch.randn(n), "per_token", None):
            _assert_same(y, r)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        wq, ws = _weights(n, k, "channel")
        for y, r in _both(torch.randn(m, k), wq, ws, None, "per_tensor", None):
            _assert_same(y, r)
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_non_contiguous_and_batched_inputs(isa):
    torch.manual_seed(1)
    k, n = 200, 9
    wq, ws = _weights(n, k, "channel")
    base = torch.randn(3, k, 8)
    x = base.transpose(1, 2)  # [3, 8, K], non-contiguous
    assert not x.is_contiguous()
    p = pack_ternary(wq)
    y = torch.ops.bitlab.ternary_linear(x, p, ws, None)
    _assert_same(y, reference.ternary_linear(x.contiguous(), p, ws, None))
    wide = torch.randn(4, 2 * k)[:, ::2]
    ws_strided = torch.rand(2 * n)[::2]
    _assert_same(torch.ops.bitlab.ternary_linear(wide, p, ws_strided, None),
                 reference.ternary_linear(wide.contiguous(), p, ws_strided.contiguous(), None))


@needs_kernel
def test_int8_static_scale_saturating_to_minus_128(isa):
    """A static act_scale can clip activations to -128: the int8 path must stay exact."""
    torch.manual_seed(2)
    x = torch.randn(6, 100) * 100
    w8 = torch.randint(-128, 128, (7, 100), dtype=torch.int8)
    ws = torch.rand(7)
    s = torch.tensor([1.7])
    q = reference.quantize_int8(x, s)
    assert (q == -128).any()
    _assert_same(torch.ops.bitlab.int8_linear(x, w8, ws, None, "per_token", s),
                 reference.int8_linear(x, w8, ws, None, "per_token", s))


@needs_kernel
@pytest.mark.parametrize("pos", [0, 7, 8, 63, 98])  # in an 8-byte word, at its edges, in the ragged tail
def test_int8_conv_one_position_with_a_single_minus_128_code(isa, pos):
    """Pre-quantized inputs (the conv path) are scanned for -128 codes 8 bytes at a time: one -128 anywhere in a
    row must be found, or the AVX2 int8 decode loop (which needs no -128) would give a wrong sum."""
    torch.manual_seed(3)
    x = torch.randn(1, 99, 1, 1) * 0.1  # one output position: M = 1, K = 99
    x[0, pos] = -10.0  # the only value that a static multiplier of 13 clips to -128
    s = torch.tensor([13.0])
    assert int((reference.quantize_int8(x, s) == -128).sum()) == 1
    w8 = torch.randint(-128, 128, (5, 99, 1, 1), dtype=torch.int8)
    ws = torch.rand(1)
    conv = ([1, 1], [0, 0], [1, 1], 1, "per_tensor", s)
    _assert_same(torch.ops.bitlab.int8_conv2d(x, w8, ws, None, *conv), reference.int8_conv2d(x, w8, ws, None, *conv))


@needs_kernel
def test_empty_batch_and_act_none():
    p = pack_ternary(torch.randint(-1, 2, (5, 70)))
    ws = torch.rand(5)
    y = torch.ops.bitlab.ternary_linear(torch.randn(0, 70), p, ws, None)
    assert y.shape == (0, 5)
    x = torch.randn(3, 70)
    torch.testing.assert_close(torch.ops.bitlab.ternary_linear(x, p, ws, None, "none"),
                               reference.ternary_linear(x, p, ws, None, "none"), rtol=1e-5, atol=1e-5)


def _weight_only(fmt, x, wq, ws, bias):
    """(kernel, reference) of the weight-only op (act="none") for one weight format."""
    k = x.shape[-1]
    if fmt == "ternary":
        p = pack_ternary(wq)
        return (torch.ops.bitlab.ternary_linear(x, p, ws, bias, "none", None, k),
                reference.ternary_linear(x, p, ws, bias, "none", None))
    if fmt == "int4":
        p = pack_int4(wq)
        return (torch.ops.bitlab.int4_linear(x, p, ws, bias, "none", None, k),
                reference.int4_linear(x, p, ws, bias, "none", None, k))
    return (torch.ops.bitlab.int8_linear(x, wq, ws, bias, "none", None),
            reference.int8_linear(x, wq, ws, bias, "none", None))


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["ternary", "int4", "int8"]), m=st.integers(0, 12), k=st.integers(1, 300),
       n=st.integers(1, 20), scale=st.sampled_from(["tensor", "channel", "group"]), has_bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_weight_only_matches_reference(isa, fmt, m, k, n, scale, has_bias, dtype, seed):
    """act="none" (bfx.weight_only): M <= 2 (decode) dots float activations with the weights straight from their
    packed form, float sums in another order than the reference's x @ (w * ws).T; M > 2 on layers up to 1M
    weights expands w * ws in C and multiplies with the reference's own matmul, so it is the reference bitwise."""
    gen = torch.Generator().manual_seed(seed)
    if scale == "group":
        k = max(2, k // 2 * 2)
    lo, hi = {"ternary": (-1, 2), "int4": (-8, 8), "int8": (-127, 128)}[fmt]
    wq = torch.randint(lo, hi, (n, k), dtype=torch.int8, generator=gen)
    ws = {"tensor": torch.rand(1, generator=gen), "channel": torch.rand(n, generator=gen),
          "group": torch.rand(n, 2, generator=gen)}[scale] + 0.01
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen) if has_bias else None
    y, r = _weight_only(fmt, x, wq, ws, bias)
    assert y.shape == r.shape and y.dtype == r.dtype
    if m > 2:
        assert torch.equal(y, r)
    elif m:  # a few fp32 ulps of sum |x * w * ws|, plus the output dtype's rounding
        bound = x.float().abs() @ wq.float().abs().t() * ws.max()
        tol = 1e-5 * bound + (2 ** -7 if dtype == torch.bfloat16 else 1e-6) * r.float().abs() + 1e-6
        assert ((y.float() - r.float()).abs() <= tol).all()


@needs_kernel
@pytest.mark.parametrize("stride,padding,dilation,groups", [([1, 1], [1, 1], [1, 1], 1), ([2, 1], [0, 2], [2, 1], 1),
                                                            ([1, 1], [1, 1], [1, 1], 2)])
@pytest.mark.parametrize("act", ["per_token", "per_tensor", "static"])
def test_conv2d_matches_reference_bitwise(isa, stride, padding, dilation, groups, act):
    torch.manual_seed(3)
    x = torch.randn(2, 4, 9, 8)
    shape = [6, 4 // groups, 3, 3]
    wq = torch.randint(-1, 2, shape)
    ws, bias = torch.rand(6), torch.randn(6)
    a, s = ("per_token", torch.tensor([9.0])) if act == "static" else (act, None)
    p = pack_ternary(wq.reshape(6, -1))
    _assert_same(torch.ops.bitlab.ternary_conv2d(x, p, ws, bias, shape, stride, padding, dilation, groups, a, s),
                 reference.ternary_conv2d(x, p, ws, bias, shape, stride, padding, dilation, groups, a, s))
    w8 = (wq * 5).to(torch.int8)
    _assert_same(torch.ops.bitlab.int8_conv2d(x, w8, ws[:1], None, stride, padding, dilation, groups, a, s),
                 reference.int8_conv2d(x, w8, ws[:1], None, stride, padding, dilation, groups, a, s))


@needs_kernel
def test_opcheck():
    torch.manual_seed(4)
    x, wq = torch.randn(3, 130), torch.randint(-1, 2, (5, 130))
    p, ws, b = pack_ternary(wq), torch.rand(5), torch.randn(5)
    torch.library.opcheck(torch.ops.bitlab.ternary_linear.default, (x, p, ws, b, "per_token", None, 130))
    torch.library.opcheck(torch.ops.bitlab.ternary_linear.default, (x, p, torch.rand(1), None, "per_tensor", None))
    torch.library.opcheck(torch.ops.bitlab.int8_linear.default, (x, wq.to(torch.int8), ws, b, "per_token", None))
    xc = torch.randn(1, 3, 6, 6)
    wc = torch.randint(-1, 2, (4, 3, 3, 3))
    torch.library.opcheck(torch.ops.bitlab.ternary_conv2d.default,
                          (xc, pack_ternary(wc.reshape(4, -1)), torch.rand(4), None, [4, 3, 3, 3], [1, 1], [1, 1],
                           [1, 1], 1, "per_token", None))
    torch.library.opcheck(torch.ops.bitlab.int8_conv2d.default,
                          (xc, wc.to(torch.int8), torch.rand(4), torch.randn(4), [1, 1], [0, 0], [1, 1], 1,
                           "per_tensor", None))


@needs_kernel
def test_disable_env_var_gives_same_results(monkeypatch):
    torch.manual_seed(5)
    x, wq = torch.randn(7, 300), torch.randint(-1, 2, (11, 300))
    p, ws = pack_ternary(wq), torch.rand(11)
    fast = torch.ops.bitlab.ternary_linear(x, p, ws, None)
    monkeypatch.setenv("BITLAB_FX_DISABLE_CPU_KERNEL", "1")
    assert cpu.kernel_library() is None
    _assert_same(torch.ops.bitlab.ternary_linear(x, p, ws, None), fast)


def _python(code, env, timeout=120):
    full = dict(os.environ, **env)
    full.pop("BITLAB_FX_DISABLE_CPU_KERNEL", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=timeout)


_RUN_ONCE = """
    import json, os, warnings, torch
    warnings.simplefilter("always")
    import bitlab_fx
    from bitlab_fx.ops import cpu, reference
    from bitlab_fx.quant.packing import pack_int4, pack_ternary
    cache = os.environ["BITLAB_FX_CACHE_DIR"]
    compiled_at_import = os.path.isdir(cache) and bool(os.listdir(cache))
    torch.manual_seed(0)
    x, p, ws = torch.randn(4, 200), pack_ternary(torch.randint(-1, 2, (9, 200))), torch.rand(9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [torch.ops.bitlab.ternary_linear(x, p, ws, None) for _ in range(3)]
    same = all(torch.equal(y, reference.ternary_linear(x, p, ws, None)) for y in ys)
    print(json.dumps({"kernel": cpu.kernel_library() is not None, "same": same, "import": compiled_at_import,
                      "warnings": [str(w.message) for w in caught if "bitlab_fx" in str(w.message)]}))
"""


def test_missing_compiler_warns_once_and_falls_back(tmp_path):
    res = _python(_RUN_ONCE, {"CC": "/nonexistent/cc", "BITLAB_FX_CACHE_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"kernel": False, "same": True, "import": False, "warnings": out["warnings"]}
    assert len(out["warnings"]) == 1 and "reference" in out["warnings"][0]


_BUILD_ONLY = """
    import ctypes, importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("_build", sys.argv[1])  # stdlib only: no torch import
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    print(json.dumps({"abi": ctypes.CDLL(str(build.build())).bitlab_abi_version()}))
"""


@needs_kernel
def test_two_processes_compile_into_empty_cache_at_once(tmp_path):
    full = dict(os.environ, BITLAB_FX_CACHE_DIR=str(tmp_path / "cache"))
    build_py = os.path.join(os.path.dirname(cpu.__file__), "_build.py")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_BUILD_ONLY), build_py], env=full,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {"abi": LIB.bitlab_abi_version()}
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].endswith(".so"), files  # no temp files left behind


@needs_kernel
@pytest.mark.parametrize("fmt", ["ternary", "int8", "int4"])
def test_weight_only_conv2d_matches_reference(isa, fmt):
    """act="none" conv2d: the reference's float conv (what the prepared model computes), on every ISA."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 9)
    lo, hi = {"ternary": (-1, 2), "int4": (-8, 8), "int8": (-127, 128)}[fmt]
    wq = torch.randint(lo, hi, (6, 3, 3, 3), dtype=torch.int8)
    ws = torch.rand(6) + 0.01
    conv = ([2, 1], [1, 2], [1, 1], 1, "none", None)
    if fmt == "int8":
        y = torch.ops.bitlab.int8_conv2d(x, wq, ws, None, *conv)
        r = reference.int8_conv2d(x, wq, ws, None, *conv)
    else:
        pack = pack_ternary if fmt == "ternary" else pack_int4
        op = torch.ops.bitlab.ternary_conv2d if fmt == "ternary" else torch.ops.bitlab.int4_conv2d
        ref = reference.ternary_conv2d if fmt == "ternary" else reference.int4_conv2d
        args = (pack(wq.reshape(6, -1)), ws, None, [6, 3, 3, 3], *conv)
        y, r = op(x, *args), ref(x, *args)
    torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_portable_build_without_x86_intrinsics(tmp_path):
    """The source must build and be exact on CPUs that are not x86 (ARM...): compile it with the x86 paths
    switched off, load it, and compare one op with the reference."""
    import ctypes
    from bitlab_fx.ops.cpu import _build

    src = _build.SOURCE.read_text().replace("#if defined(__x86_64__) || defined(__i386__)", "#if 0", 1)
    assert src != _build.SOURCE.read_text()
    (tmp_path / "portable.c").write_text(src)
    cc = _build.compiler()
    so = tmp_path / "portable.so"
    for omp in (["-fopenmp"], []):  # like _build: without OpenMP where the compiler has none
        objs = [str(tmp_path / f"p{part}.o") for part in (1, 2)]
        steps = [cc + _build.CFLAGS + omp + [f"-DBITLAB_PART={part}", "-c", str(tmp_path / "portable.c"), "-o", obj]
                 for part, obj in zip((1, 2), objs)] + [cc + ["-shared"] + omp + objs + ["-o", str(so), "-lm"]]
        if all(subprocess.run(step, capture_output=True).returncode == 0 for step in steps):
            break
    else:
        pytest.fail("the portable (non-x86) build of bitlab_cpu.c does not compile")
    lib = ctypes.CDLL(str(so))
    assert lib.bitlab_best_isa() == 0  # scalar
    torch.manual_seed(0)
    m, k, n = 3, 200, 7
    x, wq, ws = torch.randn(m, k), torch.randint(-1, 2, (n, k)), torch.rand(n) + 0.01
    p = pack_ternary(wq)
    out = torch.empty(m, n)
    f = ctypes.c_void_p
    lib.bitlab_linear.argtypes = [f, ctypes.c_int64, ctypes.c_int64, f, ctypes.c_int, ctypes.c_int64, f, ctypes.c_int,
                                  ctypes.c_int64, f, ctypes.c_int, ctypes.c_float, f, ctypes.c_int]
    assert lib.bitlab_linear(x.data_ptr(), m, k, p.data_ptr(), 0, n, ws.data_ptr(), 1, 1, None, 0, 0.0,
                             out.data_ptr(), 2) == 0
    assert torch.equal(out, reference.ternary_linear(x, p, ws, None))


@needs_kernel
@pytest.mark.parametrize("fmt", ["ternary", "int4", "int8"])
def test_weight_only_large_layer_batched(isa, fmt):
    """Above 1M weights a batched weight-only call of <= 32 tokens runs the kernel (4 expanded rows at a time, float sums in its
    own order) instead of a transient fp32 copy of the whole weight."""
    torch.manual_seed(11)
    n, k = 1030, 1100  # 1.13M weights; odd sizes for the row and k tails
    lo, hi = {"ternary": (-1, 2), "int4": (-8, 8), "int8": (-127, 128)}[fmt]
    wq = torch.randint(lo, hi, (n, k), dtype=torch.int8)
    ws, bias, x = torch.rand(n) + 0.01, torch.randn(n), torch.randn(5, k)
    y, r = _weight_only(fmt, x, wq, ws, bias)
    bound = x.abs() @ wq.float().abs().t() * ws.max()
    assert ((y - r).abs() <= 1e-5 * bound + 1e-5).all()
