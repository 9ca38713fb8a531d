"""The grouped-expert ops ``bitlab.<format>_grouped_linear``: one call = each expert's ``<format>_linear`` on its rows."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bitlab_fx.errors import KernelError
from bitlab_fx.ops import reference
from bitlab_fx.quant.formats import WEIGHT_FORMATS

FORMATS = {"ternary": 1, "int4": 7, "int8": 127}  # format -> max |code|
EXPERTS, N, K = 4, 24, 256


def _experts(fmt, scales="per_channel", bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = FORMATS[fmt]
    codes = torch.randint(-q, q + 1, (EXPERTS, N, K), generator=g, dtype=torch.int8)
    stored = WEIGHT_FORMATS[fmt].store(codes.reshape(EXPERTS * N, K)).reshape(EXPERTS, N, -1)
    shape = {"per_channel": (EXPERTS, N), "per_expert": (EXPERTS, 1), "per_group": (EXPERTS, N, K // 64)}[scales]
    ws = torch.rand(shape, generator=g) * 0.1 + 0.01
    b = torch.randn(EXPERTS, N, generator=g) if bias else None
    return codes, stored, ws, b


def _rows(counts, seed=1):
    x = torch.randn(sum(counts), K, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor(counts).cumsum(0)


def _per_expert_linear(fmt, x, ends, stored, ws, b, act, mult):
    """What the op means, written with the single-expert ops: ``<format>_linear`` on each block of rows."""
    linear = getattr(torch.ops.bitlab, f"{fmt}_linear")
    out, start = [], 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            extra = {} if fmt == "int8" else {"in_features": K}
            out.append(linear(x[start:end], stored[e], ws[e], None if b is None else b[e], act, act_multiplier=mult,
                              **extra))
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("counts", [[1, 0, 1, 0], [5, 0, 17, 3]], ids=["decode", "prefill"])
@pytest.mark.parametrize("act", ["per_token", "none", "static"])
def test_op_is_each_experts_linear_on_its_rows(isa, fmt, counts, act):
    codes, stored, ws, b = _experts(fmt, bias=act == "none")
    x, ends = _rows(counts)
    mult = torch.tensor([9.5]) if act == "static" else None
    mode = "per_tensor" if act == "static" else act
    op = getattr(torch.ops.bitlab, f"{fmt}_grouped_linear")
    y = op(x, ends, stored, ws, b, mode, act_multiplier=mult, in_features=K)
    assert y.shape == (sum(counts), N)
    assert torch.equal(y, _per_expert_linear(fmt, x, ends, stored, ws, b, mode, mult))
    ref = reference.grouped_linear(fmt, x, ends.tolist(), stored, ws, b, mode, mult)
    if act == "none":  # weight-only on a few rows: the kernel sums floats in its own order (as <format>_linear)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(y, ref)


@pytest.mark.parametrize("scales", ["per_expert", "per_group"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_scale_layouts_equal_the_reference(isa, fmt, scales):
    _, stored, ws, _ = _experts(fmt, scales)
    x, ends = _rows([3, 1, 0, 9])
    op = getattr(torch.ops.bitlab, f"{fmt}_grouped_linear")
    expected = reference.grouped_linear(fmt, x, ends.tolist(), stored, ws, None, "per_token", None)
    assert torch.equal(op(x, ends, stored, ws), expected)


def test_dynamic_per_tensor_takes_one_multiplier_over_all_rows():
    codes, stored, ws, _ = _experts("int8")
    x, ends = _rows([2, 3, 0, 1])
    x[0, 0] = 50.0  # the largest value of the call sets every expert's multiplier
    y = torch.ops.bitlab.int8_grouped_linear(x, ends, stored, ws, None, "per_tensor")
    mult = torch.tensor([127 / 50.0])
    assert torch.equal(y, _per_expert_linear("int8", x, ends, stored, ws, None, "per_tensor", mult))


def test_integer_codes_are_what_the_op_multiplies():
    codes, stored, ws, _ = _experts("ternary")
    x, ends = _rows([1, 1, 1, 1])
    y = torch.ops.bitlab.ternary_grouped_linear(x, ends, stored, ws, None, "none")
    expected = torch.stack([x[e] @ (codes[e].float() * ws[e][:, None]).t() for e in range(EXPERTS)])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_rows_come_back_bfloat16():
    _, stored, ws, _ = _experts("int4")
    x, ends = _rows([2, 0, 2, 1])
    y = torch.ops.bitlab.int4_grouped_linear(x.bfloat16(), ends, stored, ws)
    assert y.dtype == torch.bfloat16 and y.shape == (5, N)


@pytest.mark.parametrize("bad, match", [
    (dict(ends=torch.tensor([2, 1, 5, 6])), "non-decreasing"),
    (dict(ends=torch.tensor([1, 2, 3, 4])), "end at the 6 rows"),
    (dict(ends=torch.tensor([1, 6], dtype=torch.int64)), "group_ends must be int64"),
    (dict(x=torch.randn(6, 300)), "does not hold K=300"),
    (dict(x=torch.randn(6, K - 1)), "in_features=256"),  # fits the padding: the layer's K tells
    (dict(ws=torch.rand(EXPERTS, N + 1)), "weight_scale"),
    (dict(b=torch.randn(N)), "bias"),
    (dict(act="per_channel"), "act="),
])
def test_bad_arguments_raise_kernel_errors(bad, match):
    _, stored, ws, _ = _experts("ternary")
    args = dict(x=torch.randn(6, K), ends=torch.tensor([1, 3, 3, 6]), ws=ws, b=None, act="per_token")
    args.update(bad)
    with pytest.raises(KernelError, match=match):
        torch.ops.bitlab.ternary_grouped_linear(args["x"], args["ends"], stored, args["ws"], args["b"], args["act"],
                                                in_features=K)


def test_fake_kernel_gives_the_shape():
    _, stored, ws, _ = _experts("int8")
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(7, K))
        y = torch.ops.bitlab.int8_grouped_linear(x, mode.from_tensor(torch.tensor([1, 2, 3, 7])),
                                                 mode.from_tensor(stored), mode.from_tensor(ws))
    assert y.shape == (7, N)


def test_no_routed_rows_give_an_empty_output():
    _, stored, ws, _ = _experts("ternary")
    y = torch.ops.bitlab.ternary_grouped_linear(torch.randn(0, K), torch.zeros(EXPERTS, dtype=torch.int64), stored, ws)
    assert y.shape == (0, N)
