"""Integer biases in the ops (``bias_codes=``, schema version 3): int32 codes on the step
``weight_scale / act_multiplier`` added to the exact integer sums, ``y = fp32(acc + codes) * weight_scale / mult``,
on the reference and on every path of the CPU kernel, bit for bit."""
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.ops import _schema, reference
from bitlab_fx.quant.packing import pack_int4, pack_ternary


FORMATS = {  # weight format -> (op, weight codes range, pack)
    "ternary": (torch.ops.bitlab.ternary_linear, 1, pack_ternary),
    "int4": (torch.ops.bitlab.int4_linear, 7, pack_int4),
    "int8": (torch.ops.bitlab.int8_linear, 127, lambda w: w),
}


def _layer(fmt, m, k, n, per_channel, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = FORMATS[fmt][1]
    wq = torch.randint(-q, q + 1, (n, k), generator=g, dtype=torch.int8)
    xq = torch.randint(-128, 128, (m, k), generator=g)
    mult = torch.tensor([4.0])
    x = xq.float() / mult  # on the grid: the op's codes are xq exactly
    ws = (torch.rand(n if per_channel else 1, generator=g) + 0.5) / 64
    codes = torch.randint(-(2 ** 20), 2 ** 20, (n,), generator=g, dtype=torch.int32)
    return x, xq, wq, ws, mult, codes


def _call(fmt, x, wq, ws, mult, codes):
    op, _, pack = FORMATS[fmt]
    extra = (wq.shape[1],) if fmt != "int8" else ()
    return op(x, pack(wq), ws, None, "per_tensor", None, *extra, act_multiplier=mult, bias_codes=codes)


def _expected(xq, wq, ws, mult, codes):
    """Integer sums in int64, the codes added, rounded once to fp32, then the rescale (independent of the code)."""
    acc = xq.long() @ wq.long().t() + codes.long()
    return acc.float() * ws / mult


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 3, 70])  # decode loop, small-M tiles, batched GEMM
@pytest.mark.parametrize("per_channel", [True, False])
def test_cpu_kernel_adds_the_codes_to_the_integer_sums(isa, fmt, m, per_channel):
    x, xq, wq, ws, mult, codes = _layer(fmt, m, 300, 13, per_channel)
    y = _call(fmt, x, wq, ws, mult, codes)
    assert torch.equal(y, _expected(xq, wq, ws, mult, codes))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_reference_adds_the_codes_to_the_integer_sums(monkeypatch, fmt):
    monkeypatch.setenv("BITLAB_FX_DISABLE_CPU_KERNEL", "1")
    x, xq, wq, ws, mult, codes = _layer(fmt, 5, 200, 7, True)
    assert torch.equal(_call(fmt, x, wq, ws, mult, codes), _expected(xq, wq, ws, mult, codes))


def test_codes_differ_from_a_float_bias_added_after_the_rescale():
    """The point of the integer path: fp32(acc + codes) * step is not fp32(acc) * step + codes * bias_step."""
    x, _xq, wq, ws, mult, codes = _layer("int8", 64, 300, 13, True, seed=1)
    y = _call("int8", x, wq, ws, mult, codes)
    float_bias = codes.float() * (ws / mult)
    y_float = torch.ops.bitlab.int8_linear(x, wq, ws, float_bias, "per_tensor", act_multiplier=mult)
    torch.testing.assert_close(y, y_float)
    assert not torch.equal(y, y_float)


@pytest.mark.parametrize("fmt", ["ternary", "int4", "int8"])
def test_conv2d_ops_add_the_codes(isa, fmt):
    g = torch.Generator().manual_seed(0)
    q = FORMATS[fmt][1]
    wq = torch.randint(-q, q + 1, (6, 3, 3, 3), generator=g, dtype=torch.int8)
    xq = torch.randint(-128, 128, (2, 3, 8, 8), generator=g)
    mult, ws = torch.tensor([2.0]), torch.rand(6, generator=g) + 0.5
    codes = torch.randint(-1000, 1000, (6,), generator=g, dtype=torch.int32)
    x = xq.float() / mult
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    if fmt == "int8":
        y = torch.ops.bitlab.int8_conv2d(x, wq, ws, None, *geometry, "per_tensor", act_multiplier=mult, bias_codes=codes)
    else:
        op = {"ternary": torch.ops.bitlab.ternary_conv2d, "int4": torch.ops.bitlab.int4_conv2d}[fmt]
        packed = FORMATS[fmt][2](wq.reshape(6, -1))
        y = op(x, packed, ws, None, list(wq.shape), *geometry, "per_tensor", act_multiplier=mult, bias_codes=codes)
    acc = torch.nn.functional.conv2d(xq.double(), wq.double(), None, 1, 1) + codes.double().reshape(1, -1, 1, 1)
    assert torch.equal(y, acc.float() * ws.reshape(1, -1, 1, 1) / mult)
    ref = reference.int8_conv2d(x, wq, ws, None, *geometry, "per_tensor", mult, bias_codes=codes)
    assert torch.equal(y, ref)


@pytest.mark.parametrize("kwargs, message", [
    ({"bias": torch.zeros(8)}, "got both bias and bias_codes"),
    ({"act": "none"}, "need int8 activations with a static act_multiplier"),
    ({"act_multiplier": None}, r"act_multiplier=None"),
    ({"codes": torch.zeros(8, dtype=torch.int64)}, r"bias_codes must be int32 \[8\]"),
    ({"codes": torch.zeros(7, dtype=torch.int32)}, r"bias_codes must be int32 \[8\]"),
    ({"weight_scale": torch.ones(8, 2)}, "need one weight scale per row"),
])
def test_bad_bias_codes_are_kernel_errors_that_say_what(kwargs, message):
    args = {"bias": None, "act": "per_tensor", "act_multiplier": torch.tensor([2.0]),
                "codes": torch.zeros(8, dtype=torch.int32), "weight_scale": torch.ones(8)}
    args.update(kwargs)
    w = torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(bfx.KernelError, match=message):
        torch.ops.bitlab.int8_linear(torch.randn(2, 64), w, args["weight_scale"], args["bias"], args["act"],
                                     act_multiplier=args["act_multiplier"], bias_codes=args["codes"])


def test_schema_versions_3_and_4_keep_calls_without_codes_unchanged():
    assert _schema.SCHEMA_VERSION == 4  # 3: bias_codes; 4: act_bits, bias_bits (per-token integer biases)
    for name in ("ternary_linear", "int8_linear", "int4_linear", "ternary_conv2d", "int8_conv2d", "int4_conv2d"):
        schema = getattr(torch.ops.bitlab, name).default._schema
        last = [(a.name, str(a.default_value)) for a in schema.arguments[-3:]]
        assert last == [("bias_codes", "None"), ("act_bits", "8"), ("bias_bits", "0")]
        assert not any(a.kwarg_only for a in schema.arguments[-3:])
    x, xq, wq, ws, mult, _ = _layer("ternary", 3, 128, 8, True)
    y = torch.ops.bitlab.ternary_linear(x, pack_ternary(wq), ws, None, "per_tensor", mult, 128)  # a version-1 call
    assert torch.equal(y, _expected(xq, wq, ws, mult, torch.zeros(8, dtype=torch.int32)))


def test_program_with_bias_codes_exports_and_loads(tmp_path):
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            _, _, wq, ws, mult, codes = _layer("ternary", 1, 128, 8, True)
            for name, t in (("packed", pack_ternary(wq)), ("step", ws), ("mult", mult), ("codes", codes)):
                self.register_buffer(name, t)

        def forward(self, x):
            return torch.ops.bitlab.ternary_linear(x, self.packed, self.step, None, "per_tensor", None, 128,
                                                   act_multiplier=self.mult, bias_codes=self.codes)

    m, x = Layer(), torch.randn(3, 128)
    path = tmp_path / "codes.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(path))
    assert torch.equal(torch.export.load(str(path)).module()(x), m(x))
    torch.library.opcheck(torch.ops.bitlab.ternary_linear.default, (x, m.packed, m.step, None, "per_tensor", None, 128),
                          {"act_multiplier": m.mult, "bias_codes": m.codes})
