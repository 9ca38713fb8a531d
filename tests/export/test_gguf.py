"""bfx.export_gguf: converted Llama-family models load in llama.cpp and compute what bitlab_fx computes."""
import warnings

import numpy as np
import pytest
import torch

import bitlab_fx as bfx

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")  # CI installs it (.ci/run): these tests always run there
transformers.logging.set_verbosity_error()
VOCAB = 128
INT8_HEAD = bfx.int8()


def _converted_lm(arch: str, hidden: int, head_qc=INT8_HEAD):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("lm_head", head_qc)
    return bfx.convert(bfx.prepare_qat(model, qc).eval())


def _llama_cpp_logits(path: str, ids: list) -> torch.Tensor:
    llm = bfx.load_llama_cpp(path, n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[:len(ids)]))


def _agreement(model, path: str, length: int = 48) -> dict:
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits[0].float()
    theirs = _llama_cpp_logits(path, ids[0].tolist())
    nll = lambda logits: torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    return {"cosine_first": torch.nn.functional.cosine_similarity(ours[0], theirs[0], dim=0).item(),
            "top1": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "ppl_ratio": (nll(theirs).exp() / nll(ours).exp()).item()}


@pytest.mark.parametrize("arch,ternary_type", [("Llama", "TQ2_0"), ("Llama", "TQ1_0"), ("Mistral", "TQ2_0"),
                                               ("Qwen2", "TQ2_0")])
def test_llama_cpp_reproduces_the_converted_model(tmp_path, arch, ternary_type):
    model = _converted_lm(arch, hidden=256)
    path = str(tmp_path / "lm.gguf")
    types = bfx.export_gguf(model, path, ternary_type=ternary_type, float_type="F32")
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == ternary_type
    assert types["output.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    got = _agreement(model, path)
    assert got["cosine_first"] >= 0.999 and got["top1"] >= 0.9, got
    assert abs(got["ppl_ratio"] - 1) <= 0.02, got


def test_ternary_file_is_two_bits_per_weight(tmp_path):
    model = _converted_lm("Llama", hidden=256)
    path = tmp_path / "lm.gguf"
    bfx.export_gguf(model, str(path))
    linear_weights = 2 * (4 * 256 * 256 - 2 * 256 * 128 + 3 * 256 * 512)  # q, o 256x256; k, v 128x256; mlp 3x
    float_bytes = 2 * VOCAB * 256 + VOCAB * 256 * 34 // 32  # F16 embedding, Q8_0 head
    assert path.stat().st_size < linear_weights * 2.0625 / 8 + float_bytes + 16_000  # TQ2_0: 66 bytes per 256


def test_rows_that_are_not_whole_blocks_fall_back_to_q8_0_with_a_warning(tmp_path):
    model = _converted_lm("Llama", hidden=64)  # 64 and 128 wide rows: not multiples of 256
    path = str(tmp_path / "lm.gguf")
    with pytest.warns(UserWarning, match=r"not whole TQ2_0/Q4_0 blocks.*Q8_0"):
        types = bfx.export_gguf(model, path, float_type="F32")
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    got = _agreement(model, path)
    assert got["cosine_first"] >= 0.999 and got["top1"] >= 0.9, got


@pytest.mark.parametrize("head_qc,head_type", [(None, "F16"), (bfx.weight_only("int4"), "Q4_0")])
def test_the_lm_head_keeps_its_format(tmp_path, head_qc, head_type):
    model = _converted_lm("Llama", hidden=256, head_qc=head_qc)
    path = str(tmp_path / "lm.gguf")
    assert bfx.export_gguf(model, path)["output.weight"] == head_type
    got = _agreement(model, path)
    assert got["cosine_first"] >= 0.999 and got["top1"] >= 0.9, got


def test_the_tokenizer_tokenizes_in_llama_cpp_as_in_transformers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB * 3, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "ternary weights take two bits", "hello world"] * 20
    bpe.train_from_iterator(text, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=64)
    model = bfx.convert(bfx.prepare_qat(transformers.LlamaForCausalLM(cfg), bfx.ternary()).eval())
    path = str(tmp_path / "lm.gguf")
    bfx.export_gguf(model, path, tokenizer=tok)
    llm = bfx.load_llama_cpp(path, n_ctx=64, verbose=False, n_threads=1, vocab_only=True)
    sentence = "the lazy fox takes two bits<|endoftext|>"
    assert llm.tokenize(sentence.encode(), add_bos=False, special=True) == tok(sentence)["input_ids"]


@pytest.mark.parametrize("tied", [False, True])
def test_a_quantized_embedding_is_written_as_blocks_and_a_tied_head_reads_it(tmp_path, tied):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    qc = (bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("lm_head", INT8_HEAD)
          .set_module_name("model.embed_tokens", bfx.weight_only("int8")))
    model = bfx.convert(bfx.prepare_qat(model, qc).eval())
    assert isinstance(model.model.embed_tokens, bfx.QuantizedEmbedding)
    path = str(tmp_path / "lm.gguf")
    types = bfx.export_gguf(model, path)
    assert types["token_embd.weight"] == "Q8_0"
    assert ("output.weight" in types) == (not tied)  # tied: llama.cpp computes the head from token_embd
    got = _agreement(model, path)
    assert got["cosine_first"] >= 0.999 and got["top1"] >= 0.9, got
    assert abs(got["ppl_ratio"] - 1) <= 0.02, got


def test_bad_input_raises_an_export_error_that_says_what_to_do(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=64)
    float_model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(bfx.ExportError, match="bfx.convert"):
        bfx.export_gguf(float_model, str(tmp_path / "a.gguf"))
    with pytest.raises(bfx.ExportError, match=r"prepared.*bfx.convert\(prepared.eval\(\)\)"):
        bfx.export_gguf(bfx.prepare_qat(float_model, bfx.ternary()), str(tmp_path / "b.gguf"))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt2 = bfx.convert(bfx.prepare_qat(gpt2, bfx.ternary()).eval())
    with pytest.raises(bfx.ExportError, match="GPT2LMHeadModel is not supported.*export_onnx"):
        bfx.export_gguf(gpt2, str(tmp_path / "c.gguf"))
