"""The int4 ops (2..4-bit weights, two per byte): the CPU kernel (nibbles read directly: decode loop at M=1,
batched GEMM otherwise; the int8 fallback on CPUs without AVX2) against the reference, bitwise; the ops against
plain float math; their errors."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import bitlab_fx  # noqa: F401
import bitlab_fx as bfx
from bitlab_fx.ops import cpu, reference
from bitlab_fx.quant.packing import pack_int4

from _kernel_paths import ISAS, LIB

needs_kernel = pytest.mark.skipif(LIB is None, reason="the CPU kernel could not be built here")


@pytest.fixture(params=ISAS or ["none"])
def isa(request):  # (this file: each ISA, without the batched-path variants of tests/ops/conftest.py)
    if not ISAS:
        pytest.skip("no CPU kernel")
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(None)


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 64, 5), (7, 130, 9), (33, 256, 16)])
@pytest.mark.parametrize("act", ["per_token", "per_tensor"])
def test_int4_linear_cpu_equals_reference(m, k, n, act):
    torch.manual_seed(m * k + n)
    x = torch.randn(m, k)
    wq = torch.randint(-7, 8, (n, k), dtype=torch.int8)
    g, b = torch.rand(n) / 10, torch.randn(n)
    packed = pack_int4(wq)
    y = torch.ops.bitlab.int4_linear(x, packed, g, b, act, None, k)
    assert torch.equal(y, reference.int4_linear(x, packed, g, b, act, None, k))


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(0, 40), k=st.integers(1, 300), n=st.integers(1, 30),
       scale=st.sampled_from(["tensor", "channel", "group64", "group32"]), has_bias=st.booleans(),
       static=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_int4_kernel_paths_match_reference(isa, m, k, n, scale, has_bias, static, dtype, seed):
    """Odd K (a half-filled last byte), K not a multiple of the 64-k chunk, 4-row tiles with ragged ends, -8
    weights, xq = -128 (static scale), scale groups of whole chunks (batched path) or not (int8 fallback)."""
    gen = torch.Generator().manual_seed(seed)
    gs = {"group64": 64, "group32": 32}.get(scale)
    if gs:
        k = max(gs, k // gs * gs)
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    ws = {"tensor": torch.rand(1, generator=gen), "channel": torch.rand(n, generator=gen)}.get(scale)
    if ws is None:
        ws = torch.rand(n, k // gs, generator=gen)
    ws = ws + 0.01
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    bias = torch.randn(n, generator=gen) if has_bias else None
    act_scale = torch.tensor([2.5]) if static else None
    packed = pack_int4(wq)
    y = torch.ops.bitlab.int4_linear(x, packed, ws, bias, "per_token", act_scale, k)
    r = reference.int4_linear(x, packed, ws, bias, "per_token", act_scale, k)
    assert y.shape == r.shape and y.dtype == r.dtype
    assert torch.equal(y, r)  # per group too: both sum the G products left to right


@needs_kernel
def test_int4_conv2d_cpu_equals_reference(isa):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    wq = torch.randint(-3, 4, (6, 3, 3, 3), dtype=torch.int8)
    g = torch.rand(6) / 10
    args = (pack_int4(wq.reshape(6, -1)), g, None, [6, 3, 3, 3], [1, 1], [1, 1], [1, 1], 1, "per_token", None)
    y = torch.ops.bitlab.int4_conv2d(x, *args)
    torch.testing.assert_close(y, reference.int4_conv2d(x, *args), rtol=1e-6, atol=1e-6)


def test_int4_wrong_k_is_a_kernel_error():
    import bitlab_fx as bfx
    packed = pack_int4(torch.zeros(4, 10, dtype=torch.int8))
    with pytest.raises(bfx.KernelError):
        torch.ops.bitlab.int4_linear(torch.randn(2, 12), packed, torch.ones(4), None, "per_token", None, 10)


# -- the int4 ops against plain float math, and their errors ----------------------------------------

@pytest.mark.parametrize("k", [75, 128, 7])
def test_int4_linear_matches_dequantized_float(k):
    torch.manual_seed(k)
    wq = torch.randint(-7, 8, (12, k), dtype=torch.int8)
    g = torch.rand(12) + 0.1
    x, b = torch.randn(3, 5, k), torch.randn(12)
    y = torch.ops.bitlab.int4_linear(x, pack_int4(wq), g, b, "none", None, k)
    torch.testing.assert_close(y, F.linear(x, wq.float() * g[:, None], b), rtol=1e-5, atol=1e-4)
    y8 = torch.ops.bitlab.int4_linear(x, pack_int4(wq), g, b, "per_token", None, k)
    torch.testing.assert_close(y8, torch.ops.bitlab.int8_linear(x, wq, g, b, "per_token", None))
    torch.library.opcheck(torch.ops.bitlab.int4_linear.default, (x, pack_int4(wq), g, b, "per_token", None, k))


def test_int4_conv2d_matches_dequantized_float():
    wq = torch.randint(-4, 4, (6, 3, 5, 5), dtype=torch.int8)
    g, x = torch.rand(6) + 0.1, torch.randn(2, 3, 12, 12)
    args = (pack_int4(wq.reshape(6, -1)), g, None, [6, 3, 5, 5], [1, 1], [1, 1], [1, 1], 1, "none", None)
    y = torch.ops.bitlab.int4_conv2d(x, *args)
    torch.testing.assert_close(y, F.conv2d(x, wq.float() * g.reshape(-1, 1, 1, 1), None, 1, 1), rtol=1e-5, atol=1e-4)
    torch.library.opcheck(torch.ops.bitlab.int4_conv2d.default, (x,) + args)


def test_int4_op_errors_name_the_shapes():
    wq = torch.zeros(4, 10, dtype=torch.int8)
    with pytest.raises(bfx.KernelError, match="K=9"):
        torch.ops.bitlab.int4_linear(torch.randn(2, 9), pack_int4(wq), torch.ones(4), None, "none", None, 10)
    with pytest.raises(bfx.KernelError, match=r"expected \[4, 6\]"):
        torch.ops.bitlab.int4_linear(torch.randn(2, 12), pack_int4(wq), torch.ones(4), None, "none", None, -1)
    with pytest.raises(bfx.KernelError, match="bits=9"):
        torch.ops.bitlab.quantize_dequantize(torch.randn(2), None, 9, True, "per_tensor", 1)


@needs_kernel
@pytest.mark.parametrize("scale", ["channel", "group12"])
def test_int4_unpacked_to_int8_across_threads(isa, scale):
    """A layer large enough that the int4 -> int8 fallback unpacks its rows on several threads (the scalar ISA; scale
    groups the int4 loops do not take on any ISA), odd K: the reference's values, bit for bit."""
    torch.manual_seed(11)
    n, k = 301, 333 if scale == "channel" else 336
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    ws = torch.rand(n) + 0.01 if scale == "channel" else torch.rand(n, k // 12) + 0.01
    x = torch.randn(5, k) * 3
    packed = pack_int4(wq)
    y = torch.ops.bitlab.int4_linear(x, packed, ws, None, "per_token", None, k)
    assert torch.equal(y, reference.int4_linear(x, packed, ws, None, "per_token", None, k))
