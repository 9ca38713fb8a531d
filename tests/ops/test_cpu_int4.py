"""The CPU registration of the 2..4-bit ops (unpack + int8 kernel) equals the reference exactly."""
import pytest
import torch

import bitlab_fx  # noqa: F401
from bitlab_fx.ops import cpu, reference
from bitlab_fx.quant.packing import pack_int4

needs_kernel = pytest.mark.skipif(cpu.kernel_library() is None, reason="the CPU kernel could not be built here")


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
def test_int4_conv2d_cpu_equals_reference():
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
