"""Quantized embeddings as modules: the lookup dequantizes exactly the codes of the looked-up rows."""
import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.errors import ConvertError
from bitlab_fx.nn.embedding import FakeQuantEmbedding, QuantizedEmbedding


def _table(v=50, d=64, seed=0):
    torch.manual_seed(seed)
    return nn.Embedding(v, d)


def test_int8_rows_are_absmax_codes_times_their_step():
    emb = _table()
    q = QuantizedEmbedding.from_float(emb, bfx.IntWeight(bits=8))
    ids = torch.tensor([[0, 7, 7, 49], [3, 2, 1, 0]])
    w = emb.weight.detach()
    step = w.abs().amax(dim=1) / 127  # one step per row, written out here (not the library's code)
    expected = torch.clamp(torch.round(w / step[:, None]), -127, 127) * step[:, None]
    out = q(ids)
    assert out.shape == (2, 4, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected[ids], rtol=0, atol=1e-6)
    assert q.int_weight().abs().max() <= 127


@pytest.mark.parametrize("spec", [bfx.IntWeight(bits=8), bfx.IntWeight(bits=4, granularity="per_group:32"),
                                  bfx.TernaryWeight(), bfx.IntWeight(bits=8, granularity="per_tensor")],
                         ids=["int8", "int4-g32", "ternary", "int8-per-tensor"])
def test_converted_lookup_equals_the_prepared_lookup_bitwise(spec):
    emb = _table(v=37, d=96)
    fq = FakeQuantEmbedding(emb, spec, "emb")
    q = QuantizedEmbedding.from_float(fq, spec, fq.weight_fq)
    ids = torch.randint(0, 37, (3, 5))
    with torch.no_grad():
        assert torch.equal(q(ids), fq(ids))
    fp32_bytes = emb.weight.numel() * 4
    assert q.packed_bytes() < fp32_bytes / (3.5 if spec.format == "int8" else 6)


def test_prepared_lookup_trains_the_float_table_through_the_rounding():
    emb = _table()
    fq = FakeQuantEmbedding(emb, bfx.IntWeight(bits=4), "emb")
    ids = torch.tensor([1, 1, 5])
    fq(ids).sum().backward()
    grad = emb.weight.grad  # the same Parameter: straight-through gradient, 2 lookups of row 1, 1 of row 5
    assert torch.equal(grad[1], torch.full((64,), 2.0)) and torch.equal(grad[5], torch.ones(64))
    assert grad[[0, 2, 3, 4]].abs().sum() == 0


def test_output_dtype_follows_the_model_and_steps_stay_fp32():
    q = QuantizedEmbedding.from_float(_table(), bfx.IntWeight(bits=8)).to(torch.bfloat16)
    assert q(torch.tensor([1, 2])).dtype == torch.bfloat16
    assert q.weight_scale.dtype == torch.float32 and q.weight.numel() == 0


def test_state_dict_of_another_shape_or_format_is_refused():
    q8 = QuantizedEmbedding.from_float(_table(), bfx.IntWeight(bits=8))
    q8_other = QuantizedEmbedding.from_float(_table(v=60), bfx.IntWeight(bits=8))
    with pytest.raises((ConvertError, RuntimeError), match="embedding|size mismatch"):
        q8_other.load_state_dict(q8.state_dict())


def test_non_finite_table_is_refused_with_the_name():
    emb = _table()
    with torch.no_grad():
        emb.weight[3, 3] = float("nan")
    with pytest.raises(ConvertError, match="'tok'.*NaN"):
        QuantizedEmbedding.from_float(emb, bfx.IntWeight(bits=8), name="tok")
