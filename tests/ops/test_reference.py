"""The reference ops against a from-scratch float64 formula, and opcheck (schemas, fake kernels)."""
import pytest
import torch
import torch.nn.functional as F

import bitlab_fx  # noqa: F401
from bitlab_fx.quant.packing import pack_ternary


def _naive(x, wq, g, bias, per_token=True):
    xd = x.double()
    amax = xd.abs().amax(-1, keepdim=True) if per_token else xd.abs().amax()
    s = (127 / amax.clamp(min=1e-5).float()).double()
    xq = torch.clamp(torch.round((x.float() * s.float()).double()), -128, 127)
    y = (xq @ wq.double().t()) * g.double() / s
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (7, 130, 9), (0, 64, 4)])
@pytest.mark.parametrize("per_token", [True, False])
def test_ternary_linear_matches_naive_formula(m, k, n, per_token):
    torch.manual_seed(0)
    x = torch.randn(m, k)
    wq = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    g = torch.rand(n) + 0.1
    b = torch.randn(n)
    y = torch.ops.bitlab.ternary_linear(x, pack_ternary(wq), g, b, "per_token" if per_token else "per_tensor", None, k)
    if m == 0:
        assert y.shape == (0, n)
        return
    torch.testing.assert_close(y.double(), _naive(x, wq, g, b, per_token), rtol=1e-6, atol=1e-6)


def test_leading_dims_and_dtypes():
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    wq = torch.randint(-1, 2, (6, 40), dtype=torch.int8)
    y = torch.ops.bitlab.ternary_linear(x, pack_ternary(wq), torch.ones(6), None)
    assert y.shape == (2, 3, 6) and y.dtype == torch.bfloat16


def test_int8_conv_matches_float_conv_of_dequantized():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7)
    wq = torch.randint(-127, 128, (6, 2, 3, 3), dtype=torch.int8)
    g = torch.rand(6) / 100
    y = torch.ops.bitlab.int8_conv2d(x, wq, g, None, [2, 1], [1, 0], [1, 1], 2, "per_token", None)
    s = 127 / x.abs().amax(dim=(1, 2, 3), keepdim=True)
    xq = torch.round(x * s)
    ref = F.conv2d(xq.double(), wq.double() * g.double().view(-1, 1, 1, 1), None, [2, 1], [1, 0], [1, 1], 2) / s.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


def _opcheck_cases():
    x = torch.randn(3, 70)
    wq = torch.randint(-1, 2, (5, 70), dtype=torch.int8)
    yield torch.ops.bitlab.ternary_linear.default, (x, pack_ternary(wq), torch.rand(5), torch.randn(5), "per_token", None, 70)
    yield torch.ops.bitlab.ternary_linear.default, (x, pack_ternary(wq), torch.rand(5, 2), None, "per_tensor", None, 70)
    yield torch.ops.bitlab.int8_linear.default, (x, wq, torch.rand(5), None, "per_token", torch.tensor([3.0]))
    xc = torch.randn(2, 4, 6, 6)
    wc = torch.randint(-1, 2, (4, 4, 3, 3), dtype=torch.int8)
    yield torch.ops.bitlab.ternary_conv2d.default, (xc, pack_ternary(wc.reshape(4, -1)), torch.rand(4), None,
                                                    [4, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1, "per_token", None)
    yield torch.ops.bitlab.int8_conv2d.default, (xc, wc, torch.rand(4), torch.randn(4), [1, 1], [0, 0], [1, 1], 1,
                                                 "per_tensor", None)


@pytest.mark.parametrize("case", list(range(5)))
def test_opcheck(case):
    op, args = list(_opcheck_cases())[case]
    torch.library.opcheck(op, args)


def test_quantize_dequantize_static_and_dynamic():
    x = torch.tensor([[-1.0, 0.2, 0.5, 3.0]])
    y = torch.ops.bitlab.quantize_dequantize(x, torch.tensor([5.0]), 4, False, "per_tensor", 1)
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.2, 0.4, 3.0]]))  # round(x*5) clamped to 0..15, /5
    d = torch.ops.bitlab.quantize_dequantize(x, None, 8, True, "per_token", 1)
    torch.testing.assert_close(d, torch.round(x * 127 / 3) * 3 / 127)
    torch.library.opcheck(torch.ops.bitlab.quantize_dequantize.default, (torch.randn(3, 4), None, 4, True, "per_token", 1))
