"""Tiny random Llama/Qwen2/Mistral models, converted, and HF generate's greedy tokens: the lean engine's tests."""
import pytest
import torch

import bitlab_fx as bfx

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
DECODERS = {
    "ternary": bfx.ternary,
    "int8": bfx.int8,
    "int4": lambda: bfx.QuantConfig(weight=bfx.IntWeight(4, granularity="per_group:32"), input="int8"),
}


def tiny(arch: str, **overrides):
    """A tiny random ``<arch>ForCausalLM`` (GQA: 4 query heads on 2 kv heads)."""
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(**{**TINY, **overrides})
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    model.generation_config.eos_token_id = None  # (min_new_tokens would keep generate off it; greedy_decode is not)
    with torch.no_grad():  # HF initializes biases and norm weights to constants: make them tell positions apart
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def convert(model, decoder="ternary", embedding=None):
    qc = bfx.QConfigMapping().set_global(DECODERS[decoder]()).set_module_name("lm_head", bfx.int8())
    if embedding is not None:
        qc = qc.set_module_name("model.embed_tokens", embedding)
    return bfx.convert(bfx.prepare_qat(model, qc).eval())


def prompt(length=10, seed=1):
    # no pad id (0) in the prompt: generate would mask those positions as padding
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids, n):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)
