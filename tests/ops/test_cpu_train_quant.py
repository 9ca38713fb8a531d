"""The QAT step's C quantizers (train_quant.c): bitwise the torch expressions of quant/arithmetic.py, on every ISA."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import bitlab_fx as bfx
from bitlab_fx.ops import cpu
from bitlab_fx.ops.cpu import train_quant as T
from bitlab_fx.quant import arithmetic as A
from bitlab_fx.quant import primitives as P

pytestmark = pytest.mark.skipif(cpu.kernel_library() is None, reason="the C kernel could not be built here")
ISAS = [n for n in ("scalar", "avx2", "vnni") if cpu.kernel_library() is not None and cpu.set_isa(n) == n]
cpu.set_isa(None)


@pytest.fixture(params=ISAS)
def isa(request):
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(None)


def _with_ties(t: torch.Tensor, unit: torch.Tensor, gen) -> torch.Tensor:
    """``t`` with a quarter of its entries moved onto rounding ties ``(k + 0.5) * unit`` of their row."""
    ties = (torch.randint(-3, 3, t.shape, generator=gen).float() + 0.5) * unit
    return torch.where(torch.rand(t.shape, generator=gen) < 0.25, ties, t)


@given(rows=st.integers(1, 9), n=st.integers(1, 200), qmax=st.sampled_from([1, 7, 127]), seed=st.integers(0, 2 ** 16))
@settings(max_examples=40, deadline=None)
def test_weight_codes_are_the_torch_expression(rows, n, qmax, seed):
    gen = torch.Generator().manual_seed(seed)
    steps = torch.rand(rows, generator=gen) * 0.1 + 0.01
    w = _with_ties(torch.randn(rows, n, generator=gen) * 0.2 * qmax, steps[:, None], gen)
    want = A.weight_codes(w, steps[:, None], qmax)
    for name in ISAS:
        cpu.set_isa(name)
        got = T.weight_codes_s8(w, steps, qmax)
        assert got.dtype == torch.int8 and torch.equal(got.float(), want), name
    cpu.set_isa(None)


@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), n=st.integers(1, 300), seed=st.integers(0, 2 ** 16),
       per_tensor=st.booleans())
@settings(max_examples=40, deadline=None)
def test_activation_codes_and_multipliers_are_the_torch_expression(lead, n, seed, per_tensor):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=gen) * 3
    x.reshape(-1, n)[0] = 0  # an all-zero token: multiplier 127 / EPS, codes 0
    spec = bfx.IntActivation(granularity="per_tensor" if per_tensor else "per_token")
    ranges = x.abs()
    amax = ranges.amax() if per_tensor else ranges.amax(-1, keepdim=True)
    mult = A.multiplier(amax, 127)
    x = _with_ties(x, 1 / mult, gen)  # ties of x * mult (then the range is taken again)
    amax = x.abs().amax() if per_tensor else x.abs().amax(-1, keepdim=True)
    want_mult = A.multiplier(amax, 127)
    want = A.codes(x, want_mult, -128, 127)
    for name in ISAS:
        cpu.set_isa(name)
        codes, got_mult = T.activation_codes_s8(x, None if per_tensor else 1, 127)
        assert got_mult.shape == want_mult.shape and torch.equal(got_mult, want_mult), name
        assert codes.dtype == torch.int8 and torch.equal(codes.float(), want), name
        codes_p, mult_p = P.dynamic_activation_codes(x, spec, 1)
        assert torch.equal(codes_p.float(), want) and torch.equal(mult_p, want_mult)
    cpu.set_isa(None)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", bfx.PerGroup(16)])
@pytest.mark.parametrize("spec", ["ternary", "int4", "int8"])
def test_the_quantizers_codes_are_the_torch_paths(isa, monkeypatch, granularity, spec):
    """P.weight_codes with the C pass and with the kernel disabled (the torch ops): the same codes and steps."""
    torch.manual_seed(0)
    wspec = bfx.TernaryWeight(granularity=granularity) if spec == "ternary" else \
        bfx.IntWeight(int(spec[3:]), granularity=granularity)
    w = torch.randn(24, 64)
    fused, g = P.weight_codes(w, wspec)
    monkeypatch.setenv("BITLAB_FX_DISABLE_CPU_KERNEL", "1")
    plain, g_plain = P.weight_codes(w, wspec)
    assert fused.dtype == torch.int8 and plain.dtype == torch.float32
    assert torch.equal(fused.float(), plain) and torch.equal(g, g_plain)


def test_it_declines_what_it_does_not_compute():
    w = torch.randn(4, 8)
    steps = torch.ones(4)
    assert T.weight_codes_s8(w.bfloat16(), steps, 1) is None
    assert T.weight_codes_s8(w.clone().requires_grad_(), steps, 1) is None
    assert T.weight_codes_s8(torch.randn(4, 8), torch.ones(3), 1) is None  # one step per row
    assert T.weight_codes_s8(torch.randn(4, 8), steps, 200) is None  # beyond int8
    assert T.activation_codes_s8(torch.empty(0, 8), 1, 127) is None

    class Sub(torch.Tensor):  # a subclass (DTensor, ...): its data_ptr need not be its values
        pass

    assert T.weight_codes_s8(torch.randn(4, 8).as_subclass(Sub), steps, 1) is None
    assert T.activation_codes_s8(torch.randn(4, 8).as_subclass(Sub), 1, 127) is None


def test_strided_inputs_give_the_codes_of_their_values():
    w = torch.randn(8, 6) * 0.3
    steps = torch.rand(6) * 0.1 + 0.05
    got = T.weight_codes_s8(w.t(), steps, 1)  # a transposed view: read as its values
    assert torch.equal(got.float(), A.weight_codes(w.t(), steps[:, None], 1))
    x = torch.randn(6, 10)[:, ::2]
    codes, mult = T.activation_codes_s8(x, 1, 127)
    want_mult = A.multiplier(x.abs().amax(-1, keepdim=True), 127)
    assert torch.equal(mult, want_mult) and torch.equal(codes.float(), A.codes(x, want_mult, -128, 127))


def test_the_ops_pass_opcheck_and_run_inside_torch_compile():
    """Both quantizers are ops (torch.ops.bitlab.*) with fake kernels: torch.compile calls the one-pass kernels
    (fullgraph) and gets the eager codes."""
    x, w, steps = torch.randn(5, 40), torch.randn(3, 40), torch.rand(3) * 0.1 + 0.05
    torch.library.opcheck(torch.ops.bitlab.act_codes_s8.default, (x, 5, 127))
    torch.library.opcheck(torch.ops.bitlab.weight_codes_s8.default, (w, steps, 1))
    compiled = torch.compile(lambda x, w, s: (T.activation_codes_s8(x, 1, 127), T.weight_codes_s8(w, s, 1)),
                             fullgraph=True)
    (codes, mult), wq = compiled(x, w, steps)
    (codes_e, mult_e), wq_e = T.activation_codes_s8(x, 1, 127), T.weight_codes_s8(w, steps, 1)
    assert torch.equal(codes, codes_e) and torch.equal(mult, mult_e) and torch.equal(wq, wq_e)


def test_the_ops_compute_without_the_kernel(monkeypatch):
    """A graph compiled while the kernel was on still runs after BITLAB_FX_DISABLE_CPU_KERNEL=1: the ops then compute
    the same codes with the torch expressions."""
    x, w, steps = torch.randn(5, 40) * 2, torch.randn(3, 40) * 0.2, torch.rand(3) * 0.1 + 0.05
    want = torch.ops.bitlab.act_codes_s8(x, 5, 127), torch.ops.bitlab.weight_codes_s8(w, steps, 1)
    monkeypatch.setenv("BITLAB_FX_DISABLE_CPU_KERNEL", "1")
    (codes, mult), wq = torch.ops.bitlab.act_codes_s8(x, 5, 127), torch.ops.bitlab.weight_codes_s8(w, steps, 1)
    assert codes.dtype == wq.dtype == torch.int8 and mult.shape == (5,)
    assert torch.equal(codes, want[0][0]) and torch.equal(mult, want[0][1]) and torch.equal(wq, want[1])


@given(rows=st.integers(1, 9), n=st.integers(1, 300), divide=st.booleans(), seed=st.integers(0, 2 ** 16))
@settings(max_examples=40, deadline=None)
def test_dequantize_is_the_torch_expression(rows, n, divide, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (rows, n), generator=gen, dtype=torch.int8)
    scale = torch.rand(rows, 1, generator=gen) * 3 + 1e-3
    want = q.to(torch.float32).div_(scale) if divide else q.to(torch.float32).mul_(scale)
    for name in ISAS:
        cpu.set_isa(name)
        got = T.dequantize_s8(q, scale, divide)
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    cpu.set_isa(None)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", bfx.PerGroup(16)])
def test_the_backward_values_are_the_torch_paths(isa, monkeypatch, granularity):
    """P.dequantize_weight / P.dequantize_activation of int8 codes with the C pass and with the kernel disabled."""
    torch.manual_seed(0)
    wspec = bfx.TernaryWeight(granularity=granularity)
    wq, g = P.weight_codes(torch.randn(24, 64), wspec)
    x = torch.randn(2, 5, 64) * 3
    xq, mult = P.dynamic_activation_codes(x, bfx.IntActivation(), 1)
    xq4, mult4 = P.dynamic_activation_codes(torch.randn(3, 4, 5, 6), bfx.IntActivation(), 3)  # per sample
    fused = (P.dequantize_weight(wq, g, granularity), P.dequantize_activation(xq, mult, torch.float32),
             P.dequantize_activation(xq4, mult4, torch.float32))
    monkeypatch.setenv("BITLAB_FX_DISABLE_CPU_KERNEL", "1")
    plain = (P.dequantize_weight(wq, g, granularity), P.dequantize_activation(xq, mult, torch.float32),
             P.dequantize_activation(xq4, mult4, torch.float32))
    for a, b in zip(fused, plain):
        assert a.shape == b.shape and torch.equal(a, b)


def test_dequantize_declines_what_it_does_not_compute():
    q = torch.randint(-5, 5, (4, 6), dtype=torch.int8)
    assert T.dequantize_s8(q.float(), torch.ones(4), True) is None      # not int8
    assert T.dequantize_s8(q, torch.ones(4).double(), True) is None      # not an fp32 scale
    assert T.dequantize_s8(q, torch.ones(5), True) is None               # rows do not divide the codes
    assert not P._one_per_leading_row(q, torch.ones(1, 6))               # one per column is not one per row
    assert P._one_per_leading_row(q, torch.ones(4, 1)) and P._one_per_leading_row(q, torch.ones(()))
