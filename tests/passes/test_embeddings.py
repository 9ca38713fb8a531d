"""Embeddings through prepare_qat/convert: which rules quantize them, tied LM heads, summaries, files, errors."""
import os
import warnings

import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.errors import ConfigError
from bitlab_fx.nn.embedding import FakeQuantEmbedding, QuantizedEmbedding

INT8_ROWS = bfx.weight_only(bfx.IntWeight(bits=8))


class TinyLM(nn.Module):
    """Traces whole: embedding -> linear -> head."""

    def __init__(self, vocab=40, dim=32, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.embed(ids))))


def _mapping(emb_config=INT8_ROWS):
    return bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(nn.Embedding, emb_config)


def test_global_default_never_quantizes_an_embedding():
    pm = bfx.prepare_qat(TinyLM(), bfx.QConfigMapping().set_global(bfx.ternary()))
    assert type(pm.embed) is nn.Embedding
    cm = bfx.convert(pm.eval())
    assert type(cm.embed) is nn.Embedding and [r["layer"] for r in bfx.summary(cm).rows] == ["fc", "head"]


def test_traced_model_converts_its_embedding_to_packed_rows_equal_to_prepared():
    torch.manual_seed(0)
    pm = bfx.prepare_qat(TinyLM(), _mapping())
    assert isinstance(pm, torch.fx.GraphModule) and isinstance(pm.embed, FakeQuantEmbedding)
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        expected = pm.eval()(ids)
    cm = bfx.convert(pm)
    assert isinstance(cm.embed, QuantizedEmbedding)
    with torch.no_grad():
        assert torch.equal(cm(ids), expected)
    row = {r["layer"]: r for r in bfx.summary(cm).rows}["embed"]
    assert row["weight"] == "int8" and row["bytes_quant"] < row["bytes_fp32"] / 3.5


@pytest.mark.parametrize("rule", ["name", "regex", "type"])
def test_rules_that_name_the_embedding_quantize_it(rule):
    qc = bfx.QConfigMapping().set_global(bfx.ternary())
    qc = {"name": lambda: qc.set_module_name("embed", INT8_ROWS),
          "regex": lambda: qc.set_module_name_regex("emb.*", INT8_ROWS),
          "type": lambda: qc.set_object_type(nn.Embedding, INT8_ROWS)}[rule]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "rule matched no layer" warning for the embedding rule
        pm = bfx.prepare_qat(TinyLM(), qc)
    assert isinstance(pm.embed, FakeQuantEmbedding)


def test_tied_head_and_embedding_store_one_table(tmp_path):
    torch.manual_seed(0)
    model = TinyLM(tie=True)
    qc = _mapping().set_module_name("head", bfx.int8())
    pm = bfx.prepare_qat(model, qc)
    assert pm.embed.weight is pm.head.weight  # still one parameter while training
    cm = bfx.convert(pm.eval())
    assert cm.embed.qweight.data_ptr() == cm.head.qweight.data_ptr()
    rows = {r["layer"]: r for r in bfx.summary(cm).rows}
    assert rows["embed"]["type"] == "Embedding (tied)" and rows["embed"]["bytes_quant"] == 0
    path = os.path.join(tmp_path, "m.safetensors")
    bfx.save_quantized(cm, path)
    loaded = bfx.load_quantized(TinyLM(tie=True), path)
    ids = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), cm(ids))
    assert loaded.embed.qweight.data_ptr() == loaded.head.qweight.data_ptr()


def test_hf_llama_tied_embedding_generates_and_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    qc = _mapping().set_module_name("lm_head", bfx.int8())
    pm = bfx.prepare_qat(model, qc)
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        expected = pm.eval()(ids).logits
    cm = bfx.convert(pm)
    with torch.no_grad():
        assert torch.equal(cm(ids).logits, expected)
    assert isinstance(cm.get_input_embeddings(), QuantizedEmbedding)
    out = cm.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    path = os.path.join(tmp_path, "m.safetensors")
    bfx.save_quantized(cm, path)
    loaded = bfx.load_quantized(transformers.LlamaForCausalLM(cfg).eval(), path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_embedding_config_with_activations_is_refused_with_the_name():
    with pytest.raises(ConfigError, match="embedding 'embed'.*weight-only"):
        bfx.prepare_qat(TinyLM(), _mapping(bfx.int8()))


def test_max_norm_embedding_is_refused():
    model = TinyLM()
    model.embed.max_norm = 1.0
    with pytest.raises(ConfigError, match="max_norm"):
        bfx.prepare_qat(model, _mapping())


def test_export_frontend_says_to_use_fx_for_embeddings():
    with pytest.raises(ConfigError, match="frontend='fx'"):
        bfx.prepare_qat(TinyLM(), _mapping(), (torch.randint(0, 40, (2, 5)),), frontend="export")
