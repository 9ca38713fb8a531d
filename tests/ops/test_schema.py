"""The op schemas' argument checks (ops/_schema.py): bad input is a KernelError naming the op and the shape."""
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.quant.packing import pack_ternary


def _ternary(k=64, n=8):
    return pack_ternary(torch.zeros(n, k, dtype=torch.int8)), torch.ones(n)


@pytest.mark.parametrize("call, message", [
    (lambda p, s: torch.ops.bitlab.ternary_linear(torch.randn(2, 64), p.to(torch.int8), s), "must be uint8"),
    (lambda p, s: torch.ops.bitlab.ternary_linear(torch.randn(2, 63), p, s, None, "per_token", None, 64), "K=63"),
    (lambda p, s: torch.ops.bitlab.ternary_linear(torch.randn(2, 64), p, s, None, "per_token",
                                                   torch.ones(2), 64), "act_scale must hold one number"),
    (lambda p, s: torch.ops.bitlab.int8_linear(torch.randn(2, 64), torch.zeros(8, 64), s), "int8"),
    (lambda p, s: torch.ops.bitlab.int8_linear(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8),
                                                torch.ones(8, 5)), "do not divide K=64"),
])
def test_bad_arguments_are_kernel_errors_that_say_what(call, message):
    p, s = _ternary()
    with pytest.raises(bfx.KernelError, match=message):
        call(p, s)


def test_ops_pass_opcheck():
    p, s = _ternary()
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.bitlab.ternary_linear.default, (x, p, s, None, "per_token", None, 64))
    w8 = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    torch.library.opcheck(torch.ops.bitlab.int8_linear.default, (x, w8, s, None, "per_tensor", torch.tensor([3.0])))
