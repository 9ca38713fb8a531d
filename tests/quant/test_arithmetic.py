"""The one arithmetic: exact integer products, and the same integer codes everywhere, rounding ties included.

Values are placed exactly on rounding ties (``x * mult == k + 0.5`` in fp32, with multipliers that are not
powers of two): the fake quantizer's codes, the exact prepared layer's codes and the codes each kernel path
computes (read back through an identity weight) must all be the round-half-to-even of the tie.
"""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import bitlab_fx as bfx
from bitlab_fx.nn import QuantizedLinear
from bitlab_fx.ops import cpu, reference
from bitlab_fx.quant import arithmetic as A
from bitlab_fx.quant import exact_layers
from bitlab_fx.quant import primitives as P
from bitlab_fx.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant

ISAS = [n for n in ("scalar", "avx2", "vnni") if cpu.kernel_library() is not None and cpu.set_isa(n) == n]
cpu.set_isa(None)
PATHS = ["reference"] + ISAS


def test_int_matmul_is_exact_beyond_fp32_integers():
    """int8 x int8 codes over K = 5000: sums reach 8e7 > 2**24, still exact (float64 chunks)."""
    torch.manual_seed(0)
    xq = torch.randint(-128, 128, (3, 5000)).float()
    wq = torch.randint(-127, 128, (4, 5000)).float()
    xq[0], wq[0] = -128, -127  # the largest possible sum
    want = xq.long() @ wq.long().t()
    got = A.int_matmul(xq, wq, 127)
    assert torch.equal(got.long(), want) and want[0, 0] == 128 * 127 * 5000
    assert A.exact_chunk(1) >= 4096 and torch.equal(A.int_matmul(xq[:, :4096], wq[:, :4096].sign(), 1).long(),
                                                    xq[:, :4096].long() @ wq[:, :4096].sign().long().t())



@pytest.mark.parametrize("codes", ["int8", "fp32"])
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40), max_abs_w=st.sampled_from([1, 7, 127]),
       layout=st.sampled_from(["contiguous", "sliced"]), seed=st.integers(0, 2 ** 16))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_int_matmul_on_the_int8_gemm_is_exact(codes, m, k, n, max_abs_w, layout, seed):
    """CPU codes take torch's int8 GEMM (int32 sums; every shape, strided inputs, K = 1 on the fp32 product) and give
    the exact integer product; whole-number fp32 codes the same as int8 ones."""
    gen = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (m, 2 * k), generator=gen, dtype=torch.int8)
    wq = torch.randint(-max_abs_w, max_abs_w + 1, (n, 2 * k), generator=gen, dtype=torch.int8)
    xq, wq = (xq[:, ::2], wq[:, ::2]) if layout == "sliced" else (xq[:, :k].contiguous(), wq[:, :k].contiguous())
    got = A.int_matmul(xq if codes == "int8" else xq.float(), wq if codes == "int8" else wq.float(), max_abs_w)
    assert A.int8_gemm_fits(xq, wq, max_abs_w) == (k >= 2)
    assert got.dtype == (torch.int32 if k >= 2 else torch.float32)
    assert torch.equal(got.long(), xq.long() @ wq.long().t())


def test_int8_gemm_only_where_its_int32_sums_cannot_overflow():
    x, w = torch.zeros(2, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8)
    assert A.int8_gemm_fits(x, w, 127) and not A.int8_gemm_fits(x, w, 255)  # codes beyond int8
    long_k = 2 ** 31 // (A.X_CODE_MAX * 127) + 1
    assert not A.int8_gemm_fits(torch.zeros(1, long_k), torch.zeros(1, long_k), 127)
    assert A.int8_gemm_fits(torch.zeros(1, long_k), torch.zeros(1, long_k), 1)  # ternary: short enough
    assert not A.int8_gemm_fits(x.to("meta"), w.to("meta"), 127)  # CPU only (CUDA: its own kernels)


def test_the_int8_gemm_compiles_fullgraph_to_the_same_product():
    xq = torch.randint(-128, 128, (33, 70)).float()
    wq = torch.randint(-1, 2, (17, 70)).float()
    compiled = torch.compile(lambda a, b: A.int_matmul(a, b, 1).float() * 0.5, fullgraph=True)
    assert torch.equal(compiled(xq, wq), (xq.double() @ wq.double().t()).float() * 0.5)

def test_int_conv_is_exact():
    torch.manual_seed(1)
    xq = torch.randint(-128, 128, (2, 64, 9, 9)).float()
    wq = torch.randint(-127, 128, (8, 64, 3, 3)).float()  # 576 products of up to 16256: beyond fp32's exact chunk
    want = torch.nn.functional.conv2d(xq.double(), wq.double(), padding=1)
    assert torch.equal(A.int_conv(xq, wq, 1, 1, 1, 1, 127).double(), want)
    assert torch.equal(A.int_conv(xq, wq.sign(), 1, 1, 1, 1, 1).double(),
                       torch.nn.functional.conv2d(xq.double(), wq.sign().double(), padding=1))


def test_per_group_rescale_sums_left_to_right():
    acc = torch.tensor([[[3.0, -7.0, 11.0]]])
    ws = torch.tensor([[0.1, 0.3, 0.7]])
    products = acc.float() * ws
    want = ((products[..., 0] + products[..., 1]) + products[..., 2]) / torch.tensor([[2.5]])
    assert torch.equal(A.rescale_linear(acc, ws, torch.tensor([[2.5]])), want)


# -- rounding ties ---------------------------------------------------------------------------------

def _tie(half: float, mult: torch.Tensor):
    """An fp32 ``x`` with ``fp32(x * mult) == half`` exactly, or None when no nearby float lands on it."""
    x = torch.tensor(half, dtype=torch.float32) / mult
    for direction in (float("inf"), float("-inf")):
        c = x.clone()
        for _ in range(6):
            if float(c * mult) == half:
                return float(c)
            c = torch.nextafter(c, torch.tensor(direction))
    return None


def _kernel_codes(x: torch.Tensor, act: str, act_scale, mult: torch.Tensor) -> torch.Tensor:
    """The int8 codes the int8_linear op computes for ``x``, read back through an identity weight."""
    k = x.shape[-1]
    y = torch.ops.bitlab.int8_linear(x, torch.eye(k, dtype=torch.int8), torch.ones(k), None, act, act_scale)
    return torch.round(y * mult)


def _set_path(path, monkeypatch):
    if path == "reference":
        monkeypatch.setenv("BITLAB_FX_DISABLE_CPU_KERNEL", "1")
    else:
        cpu.set_isa(path)


_TIES = dict(amax=st.floats(0.0009765625, 1024.0, width=32), halves=st.lists(st.integers(-127, 126), min_size=4, max_size=40),
             mode=st.sampled_from(["dynamic", "static", "learned"]))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_TIES)
def test_activation_codes_agree_on_rounding_ties(path, monkeypatch, amax, halves, mode):
    amax_t = torch.tensor(amax, dtype=torch.float32)
    assume(torch.frexp(amax_t).mantissa.item() != 0.5)  # not a power of two
    static = mode != "dynamic"
    spec = bfx.IntActivation(dynamic=not static, granularity="per_tensor" if static else "per_token",
                             learned=mode == "learned")
    fq = ActivationFakeQuant(spec)
    if static:
        fq.running_amax.fill_(amax)
    if mode == "learned":  # a trained step (LSQ's forward rounds on its own, for its gradient)
        fq.observed_batches.fill_(fq.init_batches)
        fq.scale.data.fill_(amax / 127)
    mult = fq.multiplier(torch.empty(0)) if static else 127 / amax_t  # the torch expression every path uses
    ties = [t for t in (_tie(h + 0.5, mult) for h in halves) if t is not None and abs(t) <= amax]
    assume(len(ties) >= 2)
    x = torch.tensor([[amax] + ties])
    products = x[0, 1:] * mult
    assert (products - products.floor() == 0.5).all()  # every value but the max sits exactly on a tie
    want = torch.round(x * mult)  # half to even
    fake_quant_codes = torch.round(fq.eval()(x) * mult)  # what the fake quant's value stands for
    exact_codes, exact_mult = exact_layers.input_codes(x, fq, 1)
    _set_path(path, monkeypatch)
    try:
        act, act_scale = ("per_tensor", mult.reshape(1)) if static else ("per_token", None)
        kernel_codes = _kernel_codes(x, act, act_scale, mult)
    finally:
        cpu.set_isa(None)
    assert torch.equal(exact_mult.reshape(()), mult.reshape(()))
    for codes in (fake_quant_codes, exact_codes, kernel_codes, reference.quantize_int8(x, mult)):
        assert torch.equal(codes, want)


@settings(max_examples=60, deadline=None)
@given(amax=st.floats(0.0009765625, 1024.0, width=32), halves=st.lists(st.integers(-7, 6), min_size=4, max_size=30),
       learned=st.booleans())
def test_weight_codes_agree_on_rounding_ties(amax, halves, learned):
    """int4 per-channel weights with ``w / step`` on ties: the fake quant (absmax or LSQ), the codes the exact
    layer uses and the codes convert packs are the same."""
    spec = bfx.IntWeight(4, scale="learned" if learned else "absmax")
    amax_t = torch.tensor(amax, dtype=torch.float32)
    step = amax_t / 7  # absmax: the step of a row whose max |w| is amax
    assume(torch.frexp(step).mantissa.item() != 0.5)
    ties = []
    for h in halves:
        w = torch.tensor(h + 0.5) * step
        for _ in range(6):
            if float(w / step) == h + 0.5:
                ties.append(float(w))
                break
            w = torch.nextafter(w, torch.tensor(float("inf")))
    ties = [t for t in ties if abs(t) < amax]
    assume(len(ties) >= 2)
    w = torch.tensor([[amax] + ties])
    wfq = WeightFakeQuant(spec, weight=w)
    assert torch.equal(wfq.step(w).reshape(()), step)
    want = torch.round(w / step).clamp(-7, 7)
    codes, g = wfq.codes(w)
    fake_quant_codes = torch.round(wfq(w) / step)
    packed = QuantizedLinear(w, None, spec, weight_scale=g if learned else None).int_weight().float()
    for c in (codes, fake_quant_codes, packed):
        assert torch.equal(c, want)
    if learned:  # LSQ's forward (round of clamp) too
        assert torch.equal(torch.round(P.lsq_fake_quantize_weight(w, wfq.scale, spec) / step), want)
