"""Per-token integer biases and fewer activation bits in the ops (schema version 4: ``bias_bits=``, ``act_bits=``).

``bias_bits``: an IntBias on a dynamic input multiplier. The op quantizes the float bias on each token's step,
``codes[m, n] = clamp(round(bias[n] / (weight_scale[n] / s[m])), -2**(bits-1), 2**(bits-1)-1)``, and adds the
codes to the exact integer sums: ``y = fp32(acc + codes) * weight_scale / s``. ``act_bits``: the input codes are
that many bits (``s = qmax / max|x|``). The expected values below are written out with int64 sums, on the
reference and on every path of the CPU kernel (the Triton kernels: ``_triton_interp_cases.py``), bit for bit.
"""
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.quant.packing import pack_int4, pack_ternary

FORMATS = {  # weight format -> (linear op, conv op, weight codes range, pack)
    "ternary": (torch.ops.bitlab.ternary_linear, torch.ops.bitlab.ternary_conv2d, 1, pack_ternary),
    "int4": (torch.ops.bitlab.int4_linear, torch.ops.bitlab.int4_conv2d, 7, pack_int4),
    "int8": (torch.ops.bitlab.int8_linear, torch.ops.bitlab.int8_conv2d, 127, lambda w: w),
}
CASES = [("per_token", 8, 8), ("per_token", 4, 8), ("per_tensor", 8, 32), ("per_token", 3, 5)]  # act, act/bias bits


def _layer(fmt, m, k, n, per_channel, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = FORMATS[fmt][2]
    wq = torch.randint(-q, q + 1, (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 1, m).reshape(-1, 1)  # tiny rows: codes clamp
    ws = (torch.rand(n if per_channel else 1, generator=g) + 0.5) / 64
    bias = torch.randn(n, generator=g)
    return x, wq, ws, bias


def _expected(x, wq, ws, bias, act, act_bits, bias_bits):
    """Written out: the multipliers, the codes, int64 sums plus the per-token bias codes, one rounding to fp32."""
    qmax = 2 ** (act_bits - 1) - 1
    amax = x.abs().amax(-1, keepdim=True) if act == "per_token" else x.abs().amax().reshape(1, 1)
    s = qmax / amax.clamp(min=1e-5)
    xq = torch.clamp(torch.round(x * s), -qmax - 1, qmax)
    half = 2 ** (bias_bits - 1)
    codes = torch.clamp(torch.round(bias / (ws / s)), -half, half - 1)  # [M or 1, N]: the step of each token
    acc = xq.long() @ wq.long().t() + codes.long()
    return acc.float() * ws / s


def _linear(fmt, x, wq, ws, bias, act, act_bits, bias_bits):
    op, _, _, pack = FORMATS[fmt]
    extra = (None, wq.shape[1]) if fmt != "int8" else ()
    return op(x, pack(wq), ws, bias, act, *extra, act_bits=act_bits, bias_bits=bias_bits)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 3, 70])  # decode loop, small-M tiles, batched GEMM
@pytest.mark.parametrize("case", CASES, ids=[f"{a}-a{ab}-b{bb}" for a, ab, bb in CASES])
def test_cpu_kernel_adds_per_token_codes_to_the_integer_sums(isa, fmt, m, case):
    x, wq, ws, bias = _layer(fmt, m, 301, 13, per_channel=m != 3)
    assert torch.equal(_linear(fmt, x, wq, ws, bias, *case), _expected(x, wq, ws, bias, *case))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", CASES, ids=[f"{a}-a{ab}-b{bb}" for a, ab, bb in CASES])
def test_reference_adds_per_token_codes_to_the_integer_sums(monkeypatch, fmt, case):
    monkeypatch.setenv("BITLAB_FX_DISABLE_CPU_KERNEL", "1")
    x, wq, ws, bias = _layer(fmt, 6, 77, 5, per_channel=True, seed=1)
    assert torch.equal(_linear(fmt, x, wq, ws, bias, *case), _expected(x, wq, ws, bias, *case))


def test_each_token_gets_its_own_codes():
    """A token's output does not depend on the others' scales; the codes clamp to the IntBias range on tiny rows."""
    x, wq, ws, bias = _layer("int8", 4, 64, 9, per_channel=True, seed=2)
    whole = _linear("int8", x, wq, ws, bias, "per_token", 8, 8)
    for i in range(4):
        assert torch.equal(whole[i:i + 1], _linear("int8", x[i:i + 1], wq, ws, bias, "per_token", 8, 8))
    float_bias = _linear("int8", x, wq, ws, bias, "per_token", 8, 0)
    assert not torch.equal(whole, float_bias)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("act_bits", [8, 4])
def test_conv2d_codes_are_per_sample(isa, fmt, act_bits):
    """A conv's token is a sample: one multiplier and one set of bias codes per sample, odd sizes, stride and
    padding, each sample of its own scale."""
    g = torch.Generator().manual_seed(3)
    _, conv, q, pack = FORMATS[fmt]
    wq = torch.randint(-q, q + 1, (7, 5, 3, 3), generator=g, dtype=torch.int8)
    ws = (torch.rand(7, generator=g) + 0.5) / 32
    bias = torch.randn(7, generator=g)
    x = torch.randn(3, 5, 11, 9, generator=g) * torch.tensor([1e-4, 1.0, 30.0]).reshape(-1, 1, 1, 1)
    geometry = ([2, 1], [1, 0], [1, 1], 1)
    w = wq if fmt == "int8" else pack(wq.reshape(7, -1))
    shape = () if fmt == "int8" else ([7, 5, 3, 3],)
    y = conv(x, w, ws, bias, *shape, *geometry, "per_token", act_bits=act_bits, bias_bits=8)
    qmax = 2 ** (act_bits - 1) - 1
    s = qmax / x.abs().amax((1, 2, 3), keepdim=True).clamp(min=1e-5)
    xq = torch.clamp(torch.round(x * s), -qmax - 1, qmax)
    acc = torch.nn.functional.conv2d(xq.double(), wq.double(), None, *geometry)
    codes = torch.clamp(torch.round(bias / (ws / s.reshape(-1, 1))), -128, 127)  # [B, Cout]
    expected = (acc + codes.double()[:, :, None, None]).float() * ws.reshape(1, -1, 1, 1) / s
    assert torch.equal(y, expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"bias_bits": 8, "bias": None}, r"bias_bits=8 quantizes the float bias per token, so it needs bias="),
    ({"bias_bits": 8, "codes": torch.zeros(8, dtype=torch.int32), "act_multiplier": torch.tensor([2.0]),
      "act": "per_tensor"}, r"got both bias and bias_codes"),
    ({"bias_bits": 8, "act": "none"}, r"act='none' has no multiplier; pass bias_bits=0"),
    ({"bias_bits": 1}, r"bias_bits=1; use 0 \(a float bias\) or 2..32"),
    ({"bias_bits": 33}, r"bias_bits=33"),
    ({"act_bits": 9}, r"act_bits=9; use 2..8"),
    ({"act_bits": 4, "act": "none"}, r"act_bits=4 with act='none'"),
    ({"bias_bits": 8, "weight_scale": torch.ones(8, 2)}, r"bias_bits needs one weight scale per row"),
])
def test_bad_bits_are_kernel_errors_that_say_what(kwargs, message):
    args = {"bias": torch.zeros(8), "act": "per_token", "act_multiplier": None, "codes": None,
            "weight_scale": torch.ones(8), "act_bits": 8, "bias_bits": 0}
    args.update(kwargs)
    w = torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(bfx.KernelError, match=message):
        torch.ops.bitlab.int8_linear(torch.randn(2, 64), w, args["weight_scale"], args["bias"], args["act"],
                                     act_multiplier=args["act_multiplier"], bias_codes=args["codes"],
                                     act_bits=args["act_bits"], bias_bits=args["bias_bits"])


def test_program_with_per_token_bias_exports_and_loads(tmp_path):
    x, wq, ws, bias = _layer("ternary", 3, 128, 8, per_channel=True)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in (("packed", pack_ternary(wq)), ("step", ws), ("bias", bias)):
                self.register_buffer(name, t)

        def forward(self, x):
            return torch.ops.bitlab.ternary_linear(x, self.packed, self.step, self.bias, "per_token", None, 128,
                                                   act_bits=4, bias_bits=8)

    m = Layer()
    path = tmp_path / "token_bias.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(path))
    assert torch.equal(torch.export.load(str(path)).module()(x), m(x))
    assert torch.equal(m(x), _expected(x, wq, ws, bias, "per_token", 4, 8))
    torch.library.opcheck(torch.ops.bitlab.ternary_linear.default, (x, m.packed, m.step, m.bias, "per_token", None, 128),
                          {"act_bits": 4, "bias_bits": 8})
