"""``bfx.export_gguf``: a converted Hugging Face causal LM of the Llama family as a GGUF file for llama.cpp.

The GGUF holds the weights the converted model computes with, re-blocked, never re-quantized
(:mod:`bitlab_fx.export.ggml_blocks`): ternary layers as TQ2_0 or TQ1_0, int8 as Q8_0, int4 as Q4_0, each
block's scale the layer's step in fp16; a row length the type cannot hold falls back to the next exact
type, with a warning. Float tensors: norms F32, the rest ``float_type``. llama.cpp quantizes activations its
own way (int8 per block of 32 or 256 values, not per token): see docs/deploy.md for what differs.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import ExportError
from ..nn.embedding import QuantizedEmbedding
from . import ggml_blocks
from .gguf_tokenizer import add_tokenizer
from .weights import check_converted, converted_layers, layer_weight, stored_layer_weight

# Hugging Face model class -> GGUF architecture (llama.cpp runs Mistral as "llama")
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
ROPE_PERMUTED = {"llama"}  # HF keeps q/k rows in rotate-half order; llama.cpp's "llama" wants them interleaved


def export_gguf(model: torch.nn.Module, path: str, tokenizer=None, ternary_type: str = "TQ2_0",
                float_type: str = "F16") -> dict[str, str]:
    """Write a converted Llama, Mistral or Qwen2 causal LM to ``path`` as GGUF; returns {GGUF tensor: ggml type}.

    ``tokenizer``: the model's Hugging Face tokenizer (fast, BPE), written into the file so llama.cpp can
    tokenize text; without it the file holds token ids only. ``ternary_type``: "TQ2_0" (2.06 bits per
    weight, faster) or "TQ1_0" (1.69). ``float_type``: "F16" or "F32" for the embedding and float linears.
    Needs the ``export`` extra (``pip install bitlab-fx[export]``).

    >>> import torch, transformers, tempfile, os, bitlab_fx as bfx
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512,
    ...     num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=32)
    >>> lm = bfx.convert(bfx.prepare_qat(transformers.LlamaForCausalLM(cfg), bfx.ternary()).eval())
    >>> types = bfx.export_gguf(lm, os.path.join(tempfile.mkdtemp(), "lm.gguf"))
    >>> types["blk.0.attn_q.weight"], types["token_embd.weight"]
    ('TQ2_0', 'F16')
    """
    gguf_architecture(model)
    check_converted(model, "GGUF")
    return write_gguf(model, path, tokenizer, ternary_type, float_type)


def write_gguf(model: torch.nn.Module, path: str, tokenizer=None, ternary_type: str = "TQ2_0",
               float_type: str = "F16") -> dict[str, str]:
    """:func:`export_gguf` without the check that the model is converted: float linears are written as
    ``float_type`` (what the benchmarks use for llama.cpp's own F16 peer)."""
    import gguf

    arch = gguf_architecture(model)
    if ternary_type not in ("TQ2_0", "TQ1_0") or float_type not in ("F16", "F32"):
        raise ExportError(f"export_gguf: ternary_type={ternary_type!r}, float_type={float_type!r}; use "
                          "ternary_type 'TQ2_0' or 'TQ1_0' and float_type 'F16' or 'F32'")
    writer = gguf.GGUFWriter(path, arch)
    add_metadata(writer, model.config)
    if tokenizer is not None:
        add_tokenizer(writer, tokenizer, model.config)
    else:  # token ids only
        writer.add_tokenizer_model("none")
    try:
        written = add_tensors(writer, model, arch, ternary_type, float_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return written


def gguf_architecture(model: torch.nn.Module) -> str:
    """The GGUF architecture of a Hugging Face model, or an :class:`ExportError` naming the one it cannot write."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ExportError(f"export_gguf: {name} is not supported; it writes the Llama family "
                          f"({', '.join(ARCHITECTURES)}). Export other models with bfx.export_onnx, or write "
                          "the GGUF with llama.cpp's convert_hf_to_gguf.py from a float checkpoint")
    return ARCHITECTURES[name]


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = getattr(cfg, "rope_theta", None) or params.get("rope_theta", 10000.0)
    scaling = params.get("rope_type") or (getattr(cfg, "rope_scaling", None) or {}).get("rope_type")
    if scaling not in (None, "default"):
        raise ExportError(f"export_gguf: rope scaling {scaling!r} is not written yet (only plain RoPE); export "
                          "the model with bfx.export_onnx, or set the scaling with llama.cpp's --rope-scaling")
    return float(theta)


def add_metadata(writer, cfg) -> None:
    """The hyperparameters llama.cpp reads, from the Hugging Face config."""
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer.add_name(getattr(cfg, "name_or_path", "") or cfg.model_type)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_vocab_size(cfg.vocab_size)


def _rope_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order that turns HF's q/k rows (per head: the first halves of the rotary pairs, then the second
    halves) into llama.cpp's interleaved pairs; the same permutation convert_hf_to_gguf.py applies."""
    index = torch.arange(rows)
    return index.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def _row_order(hf_name: str, rows: int, cfg, arch: str) -> torch.Tensor | None:
    if arch not in ROPE_PERMUTED:
        return None
    if hf_name.endswith("self_attn.q_proj"):
        return _rope_order(rows, cfg.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj"):
        return _rope_order(rows, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    return None


def add_tensors(writer, model, arch: str, ternary_type: str, float_type: str) -> dict[str, str]:
    """Every tensor of ``model`` under its GGUF name: converted layers as ggml blocks, the rest float."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    embeddings = _quantized_embeddings(model)  # llama.cpp gathers rows of any block type
    shared = {e.stored_weight.data_ptr() for e in embeddings.values()}
    layers = {c.name: layer_weight(c) for c in converted_layers(model).values()
              if c.stored_weight.data_ptr() not in shared}  # a head tied to a quantized embedding: token_embd only
    layers.update({path: stored_layer_weight(path, e.weight_format, e.stored_weight, e.weight_scale, e.weight_shape)
                   for path, e in embeddings.items()})
    inside = tuple(path + "." for path, m in model.named_modules()  # converted layers, their fused siblings
                   if type(m).__module__.startswith("bitlab_fx.nn") and not isinstance(m, torch.fx.GraphModule))
    written, fallbacks = {}, []

    def gguf_name(hf_key: str) -> str:
        name = names.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"export_gguf: tensor {hf_key!r} has no place in a GGUF {arch!r} model; the model "
                              "has parts llama.cpp's Llama family does not run: export it with bfx.export_onnx")
        return name

    for hf_name, layer in layers.items():
        order = _row_order(hf_name, layer.codes.shape[0], cfg, arch)
        layer = layer if order is None else layer.rows(order)
        wanted = ggml_blocks.first_choice(layer.weight_format, ternary_type)
        kind, data = ggml_blocks.encode(layer, wanted)
        _add(writer, gguf_name(hf_name + ".weight"), kind, data, written)
        if kind != wanted:
            fallbacks.append(f"{hf_name} ({layer.weight_format} {tuple(layer.codes.shape)}: {kind})")
        if layer.bias is not None:
            _add(writer, gguf_name(hf_name + ".bias"), "F32", layer.bias.numpy(), written)
    _add_float_tensors(writer, model, layers, inside, gguf_name, float_type, arch, written)
    if fallbacks:
        warnings.warn(f"export_gguf: {len(fallbacks)} layer(s) have rows or groups that are not whole "
                      f"{ternary_type}/Q4_0 blocks (256 / 32 weights) and were written in the next exact type, "
                      f"same codes and steps: {', '.join(fallbacks[:4])}{' ...' if len(fallbacks) > 4 else ''}",
                      stacklevel=3)
    return written


def _quantized_embeddings(model) -> dict:
    """{module path: QuantizedEmbedding} of ``model``."""
    return {path: m for path, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}


def _add_float_tensors(writer, model, layers, inside, gguf_name, float_type, arch, written) -> None:
    cfg = model.config
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if key.startswith(inside) or module in layers or key.endswith("_extra_state"):
            continue  # a converted layer (written above), or the float copy convert keeps for tied weights
        if key == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue  # llama.cpp reads token_embd.weight when output.weight is absent
        data = tensor.detach().float()
        order = _row_order(module, data.shape[0], cfg, arch)
        if order is not None:
            data = data[order]
        kind = "F32" if data.dim() == 1 else float_type  # llama.cpp wants norms and biases in F32
        data = data.numpy()
        _add(writer, gguf_name(key), kind, data.astype("float16" if kind == "F16" else "float32"), written)


def _add(writer, name: str, kind: str, data, written: dict[str, str]) -> None:
    import gguf

    if kind in ("F16", "F32"):
        writer.add_tensor(name, data)
    else:
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    written[name] = kind

