"""M = 1 (one token: a decode step) with per-group weight scales on the CPU kernel (ops/cpu/decode_groups.c and
decode.c; ARM64: decode_neon.c, tested in test_cpu_arm.py). The decode loops take groups of whole units (int4:
32-k halves of a 64-k chunk; int8: 32-k chunks; ternary: 128-blocks or 32-k runs); other groups take the small-M
tiles. Every
path of this machine (the ``isa`` fixture: scalar, AVX2, VNNI where the CPU has it, and the batched GEMM forced)
must give reference.py's outputs bit for bit (per group: ``sum_g fp32(acc_g) * ws[n, g]`` left to right, then
``/ s``, ``+ bias``), and the same numbers as the batched / small-M paths give that token in a batch."""
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.ops import reference
from bitlab_fx.quant.packing import pack_int4, pack_ternary

from _kernel_paths import LIB

pytestmark = pytest.mark.skipif(LIB is None, reason="the CPU kernel could not be built here")

PACK = {"int4": pack_int4, "ternary": pack_ternary, "int8": lambda w: w}
QMAX = {"int4": 8, "ternary": 1, "int8": 127}
REFERENCE = {"int4": reference.int4_linear, "ternary": reference.ternary_linear, "int8": reference.int8_linear}

# (format, group size, K): int4 groups of one half (K = 160: the last chunk is half; K = 32: one half), three halves
# (96), whole chunks (64, 128; K = 576 is 9 chunks, not a multiple of 128); ternary groups of whole 128-blocks and
# of 32 / 64 k (runs; K = 96: a ragged last block); int8 groups of whole 32-k chunks and, through the tiles, of 12 k.
CASES = [("int4", 32, 160), ("int4", 32, 576), ("int4", 32, 32), ("int4", 96, 288), ("int4", 64, 576),
         ("int4", 128, 384), ("ternary", 128, 384), ("ternary", 256, 512), ("ternary", 32, 96), ("ternary", 64, 192),
         ("int8", 32, 96), ("int8", 64, 576), ("int8", 128, 384), ("int8", 12, 36)]


def _layer(fmt, gs, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    q = QMAX[fmt]
    wq = torch.randint(-q, q + (fmt != "int4"), (n, k), generator=g, dtype=torch.int8)  # int4 reaches -8
    ws = torch.rand(n, k // gs, generator=g) / 64 + 1e-3
    return PACK[fmt](wq), ws, torch.randn(n, generator=g) * 3


def _op(fmt, x, w, ws, bias, act, static):
    op = getattr(torch.ops.bitlab, f"{fmt}_linear")
    if fmt == "int8":
        return op(x, w, ws, bias, act, static)
    return op(x, w, ws, bias, act, static, x.shape[-1])


def _ref(fmt, x, w, ws, bias, act, static):
    if fmt == "int8":
        return REFERENCE[fmt](x, w, ws, bias, act, static)
    return REFERENCE[fmt](x, w, ws, bias, act, static, x.shape[-1])


def _token(k, seed, static):
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed)) * 3
    if static is not None:  # big values clamp to -128 / 127 (int8 on AVX2 then leaves the maddubs loop)
        x[:, ::7] *= 40
    return x


@pytest.mark.parametrize("fmt,gs,k", CASES)
def test_one_token_matches_reference_bitwise(isa, fmt, gs, k):
    old = torch.get_num_threads()
    try:
        for n in (1, 7, 13):  # one row; a 4-row tile and a ragged end
            w, ws, b = _layer(fmt, gs, k, n, seed=k + n + gs)
            for act, static in (("per_token", None), ("per_tensor", None), ("per_tensor", torch.tensor([2.0]))):
                x = _token(k, n + k, static)
                want = _ref(fmt, x, w, ws, b, act, static)
                want_no_bias = _ref(fmt, x, w, ws, None, act, static)
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    assert torch.equal(_op(fmt, x, w, ws, b, act, static), want), (n, act, threads)
                    assert torch.equal(_op(fmt, x, w, ws, None, act, static), want_no_bias), (n, act, threads)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("fmt,gs,k", [("int4", 32, 1024), ("int4", 64, 1024), ("int4", 96, 960),
                                      ("int8", 32, 1024), ("ternary", 128, 1024)])
def test_rows_split_over_two_threads(isa, fmt, gs, k):
    """Enough work that two threads share the rows (each its own 4-row tiles and ragged end), odd N."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        w, ws, b = _layer(fmt, gs, k, 301, seed=gs + k)
        x = _token(k, 5, None)
        assert torch.equal(_op(fmt, x, w, ws, b, "per_token", None), _ref(fmt, x, w, ws, b, "per_token", None))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("fmt,gs,k", CASES)
def test_one_token_equals_its_row_in_a_batch(fmt, gs, k):
    """Per-token activations: token 0 alone (the decode loop) gives what it gives among others (the tiles at M = 3,
    the batched GEMM at M = 80), bit for bit."""
    w, ws, b = _layer(fmt, gs, k, 13, seed=3)
    batch = torch.randn(80, k, generator=torch.Generator().manual_seed(4)) * 3
    alone = _op(fmt, batch[:1], w, ws, b, "per_token", None)
    assert torch.equal(alone, _op(fmt, batch[:3], w, ws, b, "per_token", None)[:1])
    assert torch.equal(alone, _op(fmt, batch, w, ws, b, "per_token", None)[:1])


@pytest.mark.parametrize("fmt", ["int4", "int8", "ternary"])
def test_integer_biases_with_per_group_scales_are_refused(fmt):
    """IntBias codes live on one step per row; with per-group scales the op says so (no per-token bias path)."""
    w, ws, b = _layer(fmt, 32, 128, 5, seed=0)
    x = torch.randn(1, 128)
    extra = () if fmt == "int8" else (128,)
    op = getattr(torch.ops.bitlab, f"{fmt}_linear")
    with pytest.raises(bfx.KernelError, match="per-group"):
        op(x, w, ws, b, "per_token", None, *extra, bias_bits=8)
    with pytest.raises(bfx.KernelError, match="per-group"):
        op(x, w, ws, None, "per_tensor", torch.tensor([2.0]), *extra, bias_codes=torch.zeros(5, dtype=torch.int32))
