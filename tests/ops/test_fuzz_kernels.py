"""Fuzz ``torch.ops.bitlab.*`` (whatever kernel is registered for the device) against
``bitlab_fx.ops.reference`` called directly, on every available device.

Two properties, for random shapes, dtypes, strides and scales:

- the integer part is exact: with integer inputs and unit scales (``act_scale = 1``, ``weight_scale = 1``)
  the output is the integer dot product itself, compared with ``torch.equal``;
- with random scales over many orders of magnitude the outputs agree to a few ulps of the output
  dtype, relative to the row's magnitude.

The CPU kernel's own, deeper tests live in tests/ops/test_cpu_kernel.py; this file adds the
view of a user: non-contiguous and batched inputs, wide scale ranges, conv geometry.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import bitlab_fx  # noqa: F401  (defines torch.ops.bitlab)
from bitlab_fx.ops import reference
from bitlab_fx.quant.packing import pack_ternary

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _assert_ulps(y, r, dtype, ulps=4):
    """|y - r| <= ulps of the output dtype times the row's max magnitude."""
    assert y.dtype == r.dtype == dtype and y.shape == r.shape and y.device == r.device
    if not r.numel():
        return
    y, r = y.float().cpu(), r.float().cpu()
    fin = torch.isfinite(r)
    assert torch.equal(y[~fin], r[~fin])  # overflow of a half dtype: the same inf in both
    y, r = y.masked_fill(~fin, 0), r.masked_fill(~fin, 0)
    row = r.abs().amax(-1, keepdim=True)
    assert ((y - r).abs() <= ulps * _ULP[dtype] * row).all(), f"max diff {(y - r).abs().max().item()}"


def _strided(x, how):
    """The same values as ``x`` in a non-contiguous layout."""
    if how == "contiguous":
        return x
    if how == "sliced":  # every other column of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if how == "transposed":  # column-major storage
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(how)


def _weights(n, k, fmt, gen):
    if fmt == "ternary":
        wq = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        return wq, pack_ternary(wq)
    wq = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    wq[wq == -128] = -127  # symmetric int8 weights
    return wq, wq


def _linear(fmt, x, w, ws, bias, act, act_scale, k, impl):
    if fmt == "ternary":
        return impl.ternary_linear(x, w, ws, bias, act, act_scale, k)
    return impl.int8_linear(x, w, ws, bias, act, act_scale)


class _Ops:
    """torch.ops.bitlab with the same call signature as the reference module."""

    ternary_linear = staticmethod(lambda *a: torch.ops.bitlab.ternary_linear(*a))
    int8_linear = staticmethod(lambda *a: torch.ops.bitlab.int8_linear(*a))
    ternary_conv2d = staticmethod(lambda *a: torch.ops.bitlab.ternary_conv2d(*a))
    int8_conv2d = staticmethod(lambda *a: torch.ops.bitlab.int8_conv2d(*a))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, **SETTINGS)
@given(lead=st.lists(st.integers(0, 5), min_size=0, max_size=2), k=st.integers(1, 300), n=st.integers(1, 40),
       fmt=st.sampled_from(["ternary", "int8"]), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["contiguous", "sliced", "transposed"]), seed=st.integers(0, 2 ** 16))
def test_integer_part_is_exact(device, lead, k, n, fmt, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    m_shape = tuple(lead) + (3,)
    x = torch.randint(-128, 128, m_shape + (k,), generator=gen).to(dtype)  # exact in every dtype
    wq, w = _weights(n, k, fmt, gen)
    ones = torch.ones(n)
    unit = torch.ones(1)
    x, w, ones, unit = (t.to(device) for t in (x, w, ones, unit))
    y = _linear(fmt, _strided(x, layout), w, ones, None, "per_tensor", unit, k, _Ops)
    want = (x.double().reshape(-1, k) @ wq.double().t().to(device)).reshape(*m_shape, n)
    r = _linear(fmt, x, w, ones, None, "per_tensor", unit, k, reference)
    assert torch.equal(r, want.float().to(dtype))  # |sum| < 2**24: exact in fp32, then one rounding to dtype
    assert torch.equal(y, r)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, **SETTINGS)
@given(m=st.integers(0, 9), k=st.integers(1, 300), n=st.integers(1, 40), fmt=st.sampled_from(["ternary", "int8"]),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "sliced", "transposed"]),
       scale=st.sampled_from(["tensor", "channel", "group"]), act=st.sampled_from(["per_token", "per_tensor", "static"]),
       x_mag=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]), w_mag=st.sampled_from([1e-4, 1e-1, 1e1]),
       has_bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_linear_matches_reference(device, m, k, n, fmt, dtype, layout, scale, act, x_mag, w_mag, has_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float16 and x_mag > 100:
        x_mag = 10.0  # keep outputs inside fp16's range
    x = (torch.randn(m, k, generator=gen) * x_mag).to(dtype)
    wq, w = _weights(n, k, fmt, gen)
    if scale == "group":
        divisors = [g for g in (1, 2, 3, 4, 8) if k % g == 0]
        groups = divisors[seed % len(divisors)]
        ws = (torch.rand(n, groups, generator=gen) + 0.05) * w_mag
    else:
        ws = (torch.rand(n if scale == "channel" else 1, generator=gen) + 0.05) * w_mag
    bias = torch.randn(n, generator=gen) if has_bias else None
    act_scale = torch.tensor([127.0 / (3 * x_mag)]) if act == "static" else None
    mode = "per_tensor" if act == "static" else act
    args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in (x, w, ws, bias, act_scale)]
    xs = _strided(args[0], layout)
    y = _linear(fmt, xs, args[1], args[2], args[3], mode, args[4], k, _Ops)
    r = _linear(fmt, args[0].contiguous(), args[1], args[2], args[3], mode, args[4], k, reference)
    _assert_ulps(y, r, dtype, ulps=8)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, **SETTINGS)
@given(b=st.integers(0, 2), cin_g=st.integers(1, 4), groups=st.sampled_from([1, 2]), cout_g=st.integers(1, 4),
       h=st.integers(3, 9), w=st.integers(3, 9), kh=st.integers(1, 3), kw=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       fmt=st.sampled_from(["ternary", "int8"]), dtype=st.sampled_from(DTYPES), channels_last=st.booleans(),
       act=st.sampled_from(["per_token", "per_tensor", "static"]), seed=st.integers(0, 2 ** 16))
def test_conv2d_matches_reference(device, b, cin_g, groups, cout_g, h, w, kh, kw, stride, padding, dilation,
                                  fmt, dtype, channels_last, act, seed):
    if (h + 2 * padding - dilation * (kh - 1) - 1) < 0 or (w + 2 * padding - dilation * (kw - 1) - 1) < 0:
        return  # no output pixel: rejected with a KernelError, tested in test_reliability
    gen = torch.Generator().manual_seed(seed)
    cin, cout = cin_g * groups, cout_g * groups
    x = torch.randn(b, cin, h, w, generator=gen).to(dtype)
    shape = [cout, cin_g, kh, kw]
    wq, packed = _weights(cout, cin_g * kh * kw, fmt, gen)
    ws = torch.rand(cout, generator=gen) + 0.05
    bias = torch.randn(cout, generator=gen)
    act_scale = torch.tensor([40.0]) if act == "static" else None
    mode = "per_tensor" if act == "static" else act
    x, packed, wq, ws, bias = (t.to(device) for t in (x, packed, wq, ws, bias))
    act_scale = None if act_scale is None else act_scale.to(device)
    xs = x.to(memory_format=torch.channels_last) if channels_last else x
    geo = ([stride] * 2, [padding] * 2, [dilation] * 2, groups, mode, act_scale)
    if fmt == "ternary":
        y = torch.ops.bitlab.ternary_conv2d(xs, packed, ws, bias, shape, *geo)
        r = reference.ternary_conv2d(x, packed, ws, bias, shape, *geo)
    else:
        w8 = wq.reshape(shape)
        y = torch.ops.bitlab.int8_conv2d(xs, w8, ws, bias, *geo)
        r = reference.int8_conv2d(x, w8, ws, bias, *geo)
    assert y.shape == r.shape and y.dtype == r.dtype == dtype
    if r.numel():
        _assert_ulps(y.permute(0, 2, 3, 1), r.permute(0, 2, 3, 1), dtype, ulps=8)
