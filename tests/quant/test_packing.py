import torch
from hypothesis import given, settings, strategies as st

from bitlab_fx.quant.packing import BLOCK, pack_int4, pack_ternary, padded_k, unpack_int4, unpack_ternary


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 8), k=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_ternary_round_trip_any_shape(n, k, seed):
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    p = pack_ternary(w)
    assert p.dtype == torch.uint8 and p.shape == (n, padded_k(k) // 4)
    assert torch.equal(unpack_ternary(p, k), w)


def test_layout_matches_the_documented_format():
    # byte j of a 128-block holds k = j, j+32, j+64, j+96 in bits 0-1, 2-3, 4-5, 6-7; code = w + 1
    w = torch.zeros(1, 130, dtype=torch.int8)
    w[0, 5], w[0, 37], w[0, 69], w[0, 101] = 1, -1, 1, -1
    w[0, 128] = 1
    p = pack_ternary(w)
    assert p[0, 5].item() == (2 << 0) | (0 << 2) | (2 << 4) | (0 << 6)
    assert p[0, 6].item() == 0b01010101  # all zeros -> code 1 everywhere
    assert p[0, 32].item() == 0b01010110  # k=128 is byte 0 of the second block
    assert p[0, 33:].eq(0b01010101).all()  # padding is zero weights


def test_padding_is_zero_code():
    p = pack_ternary(torch.zeros(2, 1, dtype=torch.int8))
    assert p.shape == (2, BLOCK // 4) and p.eq(0b01010101).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 65), seed=st.integers(0, 2**16))
def test_int4_round_trip(n, k, seed):
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack_int4(pack_int4(w), k), w)


def test_pack_ternary_of_a_transposed_view():
    """A transposed weight (Hugging Face Conv1D stores [K, N]) packs like its contiguous copy."""
    w = torch.randint(-1, 2, (256, 96), dtype=torch.int8)
    assert torch.equal(pack_ternary(w.t()), pack_ternary(w.t().contiguous()))
