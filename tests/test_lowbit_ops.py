"""The low-bit ops against plain float math: int4_linear, int4_conv2d, quantize_dequantize."""
import pytest
import torch
import torch.nn.functional as F

import bitlab_fx as bfx  # noqa: F401  (defines torch.ops.bitlab)
from bitlab_fx.quant.packing import pack_int4


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


def test_quantize_dequantize_static_and_dynamic():
    x = torch.tensor([[-1.0, 0.2, 0.5, 3.0]])
    y = torch.ops.bitlab.quantize_dequantize(x, torch.tensor([5.0]), 4, False, "per_tensor", 1)
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.2, 0.4, 3.0]]))  # round(x*5) clamped to 0..15, /5
    d = torch.ops.bitlab.quantize_dequantize(x, None, 8, True, "per_token", 1)
    torch.testing.assert_close(d, torch.round(x * 127 / 3) * 3 / 127)
    torch.library.opcheck(torch.ops.bitlab.quantize_dequantize.default, (torch.randn(3, 4), None, 4, True, "per_token", 1))


def test_int4_op_errors_name_the_shapes():
    wq = torch.zeros(4, 10, dtype=torch.int8)
    with pytest.raises(bfx.KernelError, match="K=9"):
        torch.ops.bitlab.int4_linear(torch.randn(2, 9), pack_int4(wq), torch.ones(4), None, "none", None, 10)
    with pytest.raises(bfx.KernelError, match=r"expected \[4, 6\]"):
        torch.ops.bitlab.int4_linear(torch.randn(2, 12), pack_int4(wq), torch.ones(4), None, "none", None, -1)
    with pytest.raises(bfx.KernelError, match="bits=9"):
        torch.ops.bitlab.quantize_dequantize(torch.randn(2), None, 9, True, "per_tensor", 1)
