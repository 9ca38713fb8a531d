"""Tiny Hugging Face models built from configs (random weights, nothing downloaded) for the HF tests."""
import torch

transformers = __import__("pytest").importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 96


def _causal(cls_name, cfg_name, **kw):
    cfg = getattr(transformers, cfg_name)(vocab_size=VOCAB, **kw)
    return getattr(transformers, cls_name)(cfg)


def build(name: str):
    """(model, example inputs, labels, head name, layer type names) for ``name``."""
    torch.manual_seed(0)
    llama_kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, VOCAB, (2, 12))
    if name == "llama":
        return _causal("LlamaForCausalLM", "LlamaConfig", **llama_kw), (ids,), ids, "lm_head"
    if name == "mistral":
        return _causal("MistralForCausalLM", "MistralConfig", **llama_kw), (ids,), ids, "lm_head"
    if name == "qwen2":
        return _causal("Qwen2ForCausalLM", "Qwen2Config", **llama_kw), (ids,), ids, "lm_head"
    if name == "phi3":
        return (_causal("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, bos_token_id=1, eos_token_id=2, **llama_kw),
                (ids,), ids, "lm_head")
    if name == "gpt2":
        return (_causal("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0), (ids,), ids, "lm_head")
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64, num_labels=3)
        return transformers.BertForSequenceClassification(cfg), (ids,), torch.tensor([0, 2]), "classifier"
    if name == "vit":
        cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, num_labels=3)
        return (transformers.ViTForImageClassification(cfg), (torch.randn(2, 3, 16, 16),), torch.tensor([0, 2]),
                "classifier")
    if name == "t5":
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                    decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg), None, ids, "lm_head"
    raise ValueError(name)
