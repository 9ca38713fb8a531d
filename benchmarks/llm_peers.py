"""The peers of bench_llm.py: a GGUF of the same weights for llama.cpp, and llama.cpp's decode/prefill timing.

Needs the ``bench`` extra (``gguf``, ``llama-cpp-python``); :func:`missing` says what is not installed.
The GGUF holds the weights the converted bitlab_fx model computes with: for ternary types the dequantized
ternary codes (``code * step``), which gguf-py's TQ2_0/TQ1_0 quantizers map back to the same codes (block
scale = the row's step in fp16); float tensors as F16/F32. Llama family only (what the benchmark builds).
"""
from __future__ import annotations

import importlib.util
import time
from typing import Dict, Optional

import numpy as np
import torch

LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


def missing() -> list:
    return [m for m in ("gguf", "llama_cpp") if importlib.util.find_spec(m) is None]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF q/k rows -> llama.cpp's rotary layout (interleaved halves per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: str, linear_type: str, weights: Optional[Dict[str, torch.Tensor]] = None,
                     tokenizer_from: Optional[str] = None) -> Dict[str, str]:
    """Write ``model`` (a float HF Llama) as GGUF; decoder linears as ``linear_type`` ("F16", "Q8_0", "TQ2_0",
    "TQ1_0"), using ``weights[name]`` (e.g. dequantized ternary codes) instead of the float weight where given.
    A row length the type cannot hold falls back to Q8_0 (or F16). Returns {tensor: type written}."""
    import gguf

    cfg, sd = model.config, model.state_dict()
    weights = weights or {}
    types = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, "llama")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer_from:
        _copy_tokenizer(gguf.GGUFReader(tokenizer_from), w)
    else:  # token ids only (the benchmark feeds ids)
        w.add_tokenizer_model("none")
    written = {}

    def add(name: str, t: torch.Tensor, kind: str):
        data = t.detach().float().numpy()
        if kind in ("F32", "F16"):
            w.add_tensor(name, data.astype(np.float32 if kind == "F32" else np.float16))
            written[name] = kind
            return
        qtype = getattr(types, kind)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.shape[-1] % block:
            kind = "Q8_0" if data.shape[-1] % 32 == 0 else "F16"
            return add(name, t, kind)
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        written[name] = kind

    add("token_embd.weight", sd["model.embed_tokens.weight"], "F16")
    add("output_norm.weight", sd["model.norm.weight"], "F32")
    if not cfg.tie_word_embeddings:
        add("output.weight", weights.get("lm_head", sd["lm_head.weight"]), "Q8_0")
    for i in range(cfg.num_hidden_layers):
        add(f"blk.{i}.attn_norm.weight", sd[f"model.layers.{i}.input_layernorm.weight"], "F32")
        add(f"blk.{i}.ffn_norm.weight", sd[f"model.layers.{i}.post_attention_layernorm.weight"], "F32")
        for hf, ll in LINEARS.items():
            key = f"model.layers.{i}.{hf}"
            t = weights.get(key, sd.get(key + ".weight"))
            if ll == "attn_q":
                t = _permute(t, n_head)
            elif ll == "attn_k":
                t = _permute(t, n_kv)
            add(f"blk.{i}.{ll}.weight", t, linear_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _copy_tokenizer(reader, writer) -> None:
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)


def llama_cpp_speed(path: str, prompt: list, new_tokens: int, prefill_ids: list, threads: int, repeats: int) -> dict:
    """Greedy decode tokens/s (after the prompt) and prefill tokens/s of a GGUF in llama.cpp; medians."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=max(len(prompt) + new_tokens, len(prefill_ids)) + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)
    decode, prefill, tokens = [], [], []
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt)
        out = []
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
        decode.append(new_tokens / (time.perf_counter() - t0))
        tokens = out
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prefill_ids)
        prefill.append(len(prefill_ids) / (time.perf_counter() - t0))
    return {"decode": decode, "prefill": prefill, "tokens": tokens}
