"""A Hugging Face fast tokenizer (BPE) as GGUF ``tokenizer.ggml.*`` keys, so llama.cpp tokenizes as it does.

Two kinds of BPE are written, read from the tokenizer's own JSON (``tokenizer.backend_tokenizer``):

- byte-level BPE (GPT-2 style: SmolLM, Qwen2, Llama 3): ``tokenizer.ggml.model = "gpt2"`` with the merges;
  llama.cpp also needs the name of the pre-tokenizer regex (``tokenizer.ggml.pre``), guessed from the
  tokenizer's name (:data:`PRE_TOKENIZERS`), "default" when nothing matches;
- BPE with byte fallback (SentencePiece style: Llama 2, Mistral): ``"llama"``, scores from merge order.

Tokens past the tokenizer's own up to the model's vocabulary size are written as unused padding.
"""
from __future__ import annotations

import json

from ..errors import ExportError

# substrings of a tokenizer's name_or_path -> llama.cpp's pre-tokenizer name for byte-level BPE
PRE_TOKENIZERS = (("smollm", "smollm"), ("qwen", "qwen2"), ("llama-3", "llama-bpe"), ("llama3", "llama-bpe"),
                  ("gpt2", "gpt2"))
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types


def add_tokenizer(writer, tokenizer, cfg) -> None:
    """Write ``tokenizer`` (a Hugging Face fast tokenizer of a BPE model) into the GGUF ``writer``."""
    spec = _tokenizer_json(tokenizer)
    model = spec["model"]
    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types = _tokens_and_types(spec, max(cfg.vocab_size, len(tokenizer)), byte_fallback)
    writer.add_tokenizer_model("llama" if byte_fallback else "gpt2")
    if byte_fallback:
        writer.add_token_scores([-float(i) for i in range(len(tokens))])  # earlier tokens merge first
    else:
        writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[key])(int(token_id))
    bos_first = bool(tokenizer.bos_token_id is not None and
                     tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id])
    writer.add_add_bos_token(bos_first)
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"export_gguf: tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; load "
                          "it with AutoTokenizer.from_pretrained(..., use_fast=True), or pass tokenizer=None")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise ExportError(f"export_gguf: the tokenizer's model is {spec['model']['type']}, only BPE tokenizers are "
                          "written; pass tokenizer=None (token ids only) and tokenize outside llama.cpp")
    return spec


def _tokens_and_types(spec: dict, size: int, byte_fallback: bool) -> tuple:
    """Token strings by id, padded to ``size``, and their llama.cpp types."""
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(token)
            is_byte = byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            types.append(BYTE if is_byte else NORMAL)
    return tokens, types


def _pre_tokenizer(tokenizer) -> str:
    name = str(getattr(tokenizer, "name_or_path", "")).lower()
    return next((pre for key, pre in PRE_TOKENIZERS if key in name), "default")
