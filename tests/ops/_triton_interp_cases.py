"""Triton kernels vs ``reference.py``. Run by ``test_triton_kernels.py`` in a subprocess: with
``TRITON_INTERPRET=1`` on CPU tensors, or natively on a GPU (plus opcheck, torch.compile, CUDA graphs).

Not collected on its own (no ``test_`` prefix): ``TRITON_INTERPRET`` must be set before triton is
imported and must not leak into other test modules.
"""
import os

import pytest
import torch

import bitlab_fx  # noqa: F401  (defines torch.ops.bitlab)
from bitlab_fx.ops import reference
from bitlab_fx.ops.cuda import kernels as K
from bitlab_fx.quant.packing import pack_ternary, padded_k

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if os.environ.get("BITLAB_TRITON_CASES") != "1" or (not INTERPRET and not torch.cuda.is_available()):
    pytest.skip("helper of test_triton_kernels.py, which runs it in a subprocess", allow_module_level=True)
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=1e-2),
       torch.float16: dict(rtol=1e-3, atol=2e-3)}


def _problem(m, k, n, dtype, scale, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    wq = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    ws = {"tensor": torch.rand(1, generator=g) + 0.1, "channel": torch.rand(n, generator=g) + 0.1,
          "group": torch.rand(n, k // 64, generator=g) + 0.1}[scale]
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return [t.to(DEVICE) if t is not None else None for t in (x, wq, ws, b)]


def _act(act):
    """(act, act_scale): "static" means per_token with a static multiplier."""
    return ("per_token", torch.tensor([2.5], device=DEVICE)) if act == "static" else (act, None)


def _assert_matches(y, ref, exact):
    assert y.shape == ref.shape and y.dtype == ref.dtype and y.device == ref.device
    if exact:  # integer dot product and the same fp32 rescale order: bit for bit
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    else:  # float summation order differs (per-group partial sums, act="none")
        torch.testing.assert_close(y, ref, **TOL[y.dtype])


# ---------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["per_token", "per_tensor", "static"])
@pytest.mark.parametrize("m,k", [(1, 200), (17, 260)])
def test_quantize_activations_exact(m, k, act, dtype):
    x = (torch.randn(m, k) * 3).to(dtype).to(DEVICE)
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.0, -0.0, 3.5], dtype=dtype)  # ties under s=1/2
    mode, act_scale = ("per_token", torch.tensor([0.5], device=DEVICE)) if act == "static" else (act, None)
    xq, s = K.quantize_activations(x, mode, act_scale, padded_k(k))
    s_ref = reference.act_multiplier(x.float(), mode, act_scale).reshape(-1).expand(m)
    xq_ref = reference.quantize_int8(x.float(), s_ref[:, None]).to(torch.int8)
    assert xq.shape == (m, padded_k(k)) and xq.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref.contiguous(), rtol=0, atol=0)
    torch.testing.assert_close(xq[:, :k], xq_ref, rtol=0, atol=0)
    assert not xq[:, k:].any()


def test_quantize_all_zero_row_uses_eps():
    x = torch.zeros(2, 40, device=DEVICE)
    xq, s = K.quantize_activations(x, "per_token", None, 128)
    assert not xq.any() and torch.all(s == reference.act_multiplier(x, "per_token", None).reshape(-1))


# ---------------------------------------------------------------------------------------- linear


def _linear_cases():
    """M x dtype x act x weight kind, cycling shape, scale kind and bias (a covering set, kept fast)."""
    i = 0
    for m in (1, 3, 8, 17):
        for dtype in DTYPES:
            for act in ("per_token", "per_tensor", "none", "static"):
                for packed in (True, False):
                    k, n = [(200, 37), (320, 7), (192, 9)][i % 3]
                    scale = ["channel", "tensor", "group"][(i // 3) % 3]
                    if scale == "group" and k % 64:
                        k = 320
                    yield pytest.param(m, k, n, dtype, act, scale, bool(i % 2), packed,
                                       id=f"m{m}-k{k}-n{n}-{str(dtype)[6:]}-{act}-{scale}-b{i % 2}-{'tern' if packed else 'int8'}")
                    i += 1


@pytest.mark.parametrize("m,k,n,dtype,act,scale,bias,packed", list(_linear_cases()))
def test_linear_matches_reference(m, k, n, dtype, act, scale, bias, packed):
    x, wq, ws, b = _problem(m, k, n, dtype, scale, bias)
    mode, act_scale = _act(act)
    w = pack_ternary(wq) if packed else wq
    fn, ref_fn = ((K.ternary_linear_triton, reference.ternary_linear) if packed
                  else (K.int8_linear_triton, reference.int8_linear))
    y = fn(x, w, ws, b, mode, act_scale)
    _assert_matches(y, ref_fn(x, w, ws, b, mode, act_scale), exact=act != "none" and scale != "group")


CONFIGS = {  # every code path: GEMV / dot, split-K (int32 and fp32 partials), one or two 128-blocks per step
    "gemv": K.LinearConfig(block_m=4, block_n=16, nb=2),
    "gemv-split3": K.LinearConfig(block_m=8, block_n=8, nb=1, split_k=3),
    "dot": K.LinearConfig(block_m=16, block_n=16, nb=2, use_dot=True),
    "dot-split2": K.LinearConfig(block_m=16, block_n=32, nb=1, use_dot=True, split_k=2),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("scale,act", [("channel", "per_token"), ("group", "per_tensor"), ("tensor", "none")])
@pytest.mark.parametrize("packed", [True, False], ids=["tern", "int8"])
def test_every_config_matches_reference(cfg, scale, act, packed):
    x, wq, ws, b = _problem(5, 448, 19, torch.bfloat16, scale, True, seed=1)
    w = pack_ternary(wq) if packed else wq
    fn, ref_fn = ((K.ternary_linear_triton, reference.ternary_linear) if packed
                  else (K.int8_linear_triton, reference.int8_linear))
    y = fn(x, w, ws, b, act, None, config=CONFIGS[cfg])
    _assert_matches(y, ref_fn(x, w, ws, b, act, None), exact=act != "none" and scale != "group")


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("packed", [True, False], ids=["tern", "int8"])
def test_integer_bias_codes_join_the_sums_on_every_config(cfg, packed):
    """An IntBias as int32 codes (``bias_codes``): added to the integer accumulator before the rescale, bit for bit
    the reference on every path (the GEMV and dot epilogues, and after the split-K reduction)."""
    x, wq, ws, _ = _problem(5, 448, 19, torch.float32, "channel", False, seed=2)
    codes = torch.randint(-128, 128, (19,), dtype=torch.int32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    w = pack_ternary(wq) if packed else wq
    fn, ref_fn = ((K.ternary_linear_triton, reference.ternary_linear) if packed
                  else (K.int8_linear_triton, reference.int8_linear))
    mult = torch.tensor([9.0], device=DEVICE)
    y = fn(x, w, ws, None, "per_tensor", mult, config=CONFIGS[cfg], bias_codes=codes)
    _assert_matches(y, ref_fn(x, w, ws, None, "per_tensor", mult, bias_codes=codes), exact=True)
    assert not torch.equal(y, fn(x, w, ws, None, "per_tensor", mult, config=CONFIGS[cfg]))


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("packed", [True, False], ids=["tern", "int8"])
def test_per_token_bias_and_fewer_activation_bits_on_every_config(cfg, packed):
    """An IntBias on a dynamic input (``bias_bits``: the float bias quantized per token on ``ws[n] / s[m]`` in the
    epilogue) with 4-bit activation codes (``act_bits``), odd shapes, rows of very different ranges (so every
    token has its own bias codes): bit for bit the reference on every path."""
    x, wq, ws, b = _problem(7, 200, 13, torch.float32, "channel", True, seed=4)
    x = x * torch.logspace(-3, 1, 7, device=DEVICE).reshape(-1, 1)  # tiny rows: bias codes clamp to the range
    w = pack_ternary(wq) if packed else wq
    fn, ref_fn = ((K.ternary_linear_triton, reference.ternary_linear) if packed
                  else (K.int8_linear_triton, reference.int8_linear))
    for act, act_bits, bias_bits in (("per_token", 4, 8), ("per_tensor", 8, 5), ("per_token", 8, 32)):
        y = fn(x, w, ws, b, act, None, config=CONFIGS[cfg], act_bits=act_bits, bias_bits=bias_bits)
        ref = ref_fn(x, w, ws, b, act, None, act_bits=act_bits, bias_bits=bias_bits)
        _assert_matches(y, ref, exact=True)
        assert not torch.equal(y, fn(x, w, ws, b, act, None, config=CONFIGS[cfg], act_bits=act_bits))


def test_default_configs_split_k_on_long_k():
    cfg = K.choose_config(1, 64, padded_k(8192))
    assert not cfg.use_dot and cfg.split_k > 1
    assert K.choose_config(256, 4096, 4096).use_dot
    x, wq, ws, b = _problem(2, 2048, 24, torch.float16, "channel", False, seed=2)
    y = K.ternary_linear_triton(x, pack_ternary(wq), ws, b)
    _assert_matches(y, reference.ternary_linear(x, pack_ternary(wq), ws, b), exact=True)


def test_leading_dims_strided_input_and_empty():
    x, wq, ws, b = _problem(6, 130, 11, torch.float32, "channel", True)
    wide = torch.randn(6, 200, device=DEVICE)
    wide[:, :130] = x
    xs = wide[:, :130].reshape(2, 3, 130)  # row stride 200
    y = K.ternary_linear_triton(xs, pack_ternary(wq), ws, b)
    assert y.shape == (2, 3, 11)
    _assert_matches(y, reference.ternary_linear(xs, pack_ternary(wq), ws, b), exact=True)
    empty = K.ternary_linear_triton(x[:0], pack_ternary(wq), ws, b)
    assert empty.shape == (0, 11)


@pytest.mark.parametrize("act", ["per_token", "none"])
def test_gemv_on_bytes_where_words_do_not_fit(act):
    """The dp4a GEMV reads 4-byte words; int8 weights with K % 4 != 0 and a packed weight that is an
    unaligned view take the elementwise path, with the same results."""
    x, wq, ws, b = _problem(3, 130, 13, torch.float32, "channel", True, seed=5)
    _assert_matches(K.int8_linear_triton(x, wq, ws, b, act), reference.int8_linear(x, wq, ws, b, act),
                    exact=act != "none")
    packed = pack_ternary(wq)
    buf = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device=DEVICE)
    view = buf[1:].view(packed.shape)  # data_ptr 1 byte past an aligned allocation
    view.copy_(packed)
    assert view.data_ptr() % 4 != 0
    _assert_matches(K.ternary_linear_triton(x, view, ws, b, act), reference.ternary_linear(x, packed, ws, b, act),
                    exact=act != "none")


def test_group_size_not_multiple_of_32_falls_back_to_reference():
    x, wq, ws, b = _problem(3, 200, 5, torch.float32, "channel", False)
    ws = torch.rand(5, 5, device=DEVICE) + 0.1  # groups of 40
    y = K.ternary_linear_triton(x, pack_ternary(wq), ws, b)
    _assert_matches(y, reference.ternary_linear(x, pack_ternary(wq), ws, b), exact=True)


# ---------------------------------------------------------------------------------------- autotune


@pytest.fixture
def autotune(monkeypatch):
    """Autotuning on, an empty cache, and a fake timer under which the last candidate is the fastest."""
    from bitlab_fx.ops import cuda

    previous = cuda.set_autotune(True)
    K.clear_tuned_configs()
    state = {"timed": 0, "candidates": None}
    original = K.autotune_candidates

    def candidates(*args, **kwargs):
        state["candidates"] = original(*args, **kwargs)
        return state["candidates"]

    def fake_time(fn):
        state["timed"] += 1
        return 0.5 if state["timed"] == len(state["candidates"]) else 1.0

    monkeypatch.setattr(K, "autotune_candidates", candidates)
    monkeypatch.setattr(K, "_time_us", fake_time)
    yield state
    cuda.set_autotune(previous)
    K.clear_tuned_configs()


@pytest.mark.parametrize("m", [2, 24])
def test_autotune_times_the_candidates_once_and_keeps_the_fastest(autotune, m):
    x, wq, ws, b = _problem(m, 1024, 40, torch.bfloat16, "channel", True, seed=3)
    w = pack_ternary(wq)
    y = K.ternary_linear_triton(x, w, ws, b)
    cands = autotune["candidates"]
    assert len(cands) >= 4 and autotune["timed"] == len(cands)
    (key, cfg), = K.tuned_configs().items()
    assert cfg == cands[-1] and key[:3] == (1 << (m - 1).bit_length(), 40, padded_k(1024))
    _assert_matches(y, reference.ternary_linear(x, w, ws, b), exact=True)
    y2 = K.ternary_linear_triton(x[: m - 1] if m > 2 else x, w, ws, b)  # same M bucket: cache hit, no timing
    assert autotune["timed"] == len(cands)
    _assert_matches(y2, reference.ternary_linear(x[: y2.shape[0]], w, ws, b), exact=True)


def test_every_autotune_candidate_matches_reference():
    for m, scale, act in ((1, "channel", "per_token"), (6, "group", "per_tensor"), (20, "tensor", "none")):
        x, wq, ws, b = _problem(m, 2048, 24, torch.float16, scale, True, seed=4)
        w = pack_ternary(wq)
        ref = reference.ternary_linear(x, w, ws, b, act)
        for cfg in K.autotune_candidates(m, 24, padded_k(2048), 64 if scale == "group" else 0):
            _assert_matches(K.ternary_linear_triton(x, w, ws, b, act, config=cfg), ref,
                            exact=act != "none" and scale != "group")


def test_autotune_off_by_default_and_never_under_tracing(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bitlab_fx.ops import cuda

    assert not cuda.autotune_enabled() or os.environ.get("BITLAB_TRITON_AUTOTUNE") == "1"
    monkeypatch.setattr(K, "_time_us", lambda fn: pytest.fail("timed with autotuning off"))
    previous = cuda.set_autotune(False)
    try:
        x, wq, ws, b = _problem(3, 256, 8, torch.float32, "channel", False)
        K.ternary_linear_triton(x, pack_ternary(wq), ws)
        assert K.tuned_configs() == {}
    finally:
        cuda.set_autotune(previous)
    with FakeTensorMode():
        assert not K._may_benchmark(torch.empty(2, 3))
    assert K._may_benchmark(torch.empty(2, 3))


def test_self_check_passes_and_keeps_the_assembly_paths_on():
    """On a GPU this compares the inline-assembly paths (dp4a, SWAR unpack) with the portable code bit for bit;
    under the interpreter both sides run the portable code."""
    assert K.self_check(DEVICE)
    assert K._asm_ok(torch.device(DEVICE))


# ---------------------------------------------------------------------------------------- CUDA only


def _op_args(packed):
    x, wq, ws, b = _problem(3, 200, 37, torch.bfloat16, "channel", True)
    if packed:
        return torch.ops.bitlab.ternary_linear.default, (x, pack_ternary(wq), ws, b, "per_token", None)
    return torch.ops.bitlab.int8_linear.default, (x, wq, ws, b, "per_tensor", None)


@cuda_only
@pytest.mark.parametrize("packed", [True, False], ids=["tern", "int8"])
def test_op_dispatches_to_triton_and_passes_opcheck(packed):
    op, args = _op_args(packed)
    y = op(*args)
    ref_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    ref = (reference.ternary_linear if packed else reference.int8_linear)(*ref_args)
    torch.testing.assert_close(y.cpu(), ref, **TOL[torch.bfloat16])
    torch.library.opcheck(op, args)


@cuda_only
@pytest.mark.parametrize("decompose", ["1", "0"])
def test_torch_compile_fullgraph(decompose, monkeypatch):
    monkeypatch.setenv("BITLAB_TRITON_DECOMPOSE", decompose)
    torch._dynamo.reset()
    op, args = _op_args(True)
    f = torch.compile(lambda *a: op(*a) * 2, fullgraph=True)
    torch.testing.assert_close(f(*args), op(*args) * 2, rtol=0, atol=0)


@cuda_only
def test_cuda_graph_capture_and_replay():
    op, args = _op_args(True)
    x = args[0]
    op(*args)  # load kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = op(*args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, op(*args), rtol=0, atol=0)


@cuda_only
def test_autotune_on_gpu_then_capture_and_compile_reuse_the_tuned_config():
    from bitlab_fx.ops import cuda

    previous = cuda.set_autotune(True)
    K.clear_tuned_configs()
    try:
        op, args = _op_args(True)
        x = args[0]
        graph = torch.cuda.CUDAGraph()
        op(*args)  # loads the kernels and tunes this shape (real timing with triton.testing.do_bench)
        tuned = K.tuned_configs()
        assert len(tuned) == 1
        with torch.cuda.graph(graph):  # captured with the tuned config, no timing inside the capture
            y = op(*args)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y, op(*args), rtol=0, atol=0)
        torch._dynamo.reset()
        f = torch.compile(lambda *a: op(*a), fullgraph=True)
        torch.testing.assert_close(f(*args), op(*args), rtol=0, atol=0)
        assert K.tuned_configs() == tuned
        K.clear_tuned_configs()
        with torch.cuda.graph(torch.cuda.CUDAGraph()):  # nothing tuned: capture uses the fixed config
            op(*args)
        assert K.tuned_configs() == {}
    finally:
        cuda.set_autotune(previous)
        K.clear_tuned_configs()
