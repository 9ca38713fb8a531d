"""The peers of bench_llm.py: a GGUF of the same weights for llama.cpp, and llama.cpp's decode/prefill timing.

Needs the ``bench`` extra (``gguf``, ``llama-cpp-python``); :func:`missing` says what is not installed.
The GGUF is written by ``bfx.export_gguf`` (docs/deploy.md): for TQ2_0/TQ1_0 the converted model's ternary
codes re-blocked (block scale = the row's step in fp16), so llama.cpp computes with the same weights.
"""
from __future__ import annotations

import importlib.util
import time

import numpy as np

import bitlab_fx as bfx


def missing() -> list:
    return [m for m in ("gguf", "llama_cpp") if importlib.util.find_spec(m) is None]


def write_gguf(model, path: str, kind: str, tokenizer=None) -> dict:
    """The GGUF of one llama.cpp peer: ``model`` is the converted ternary model for "TQ2_0"/"TQ1_0", the model
    converted with int8 per-group-32 absmax weights (llama.cpp's own Q8_0 rule) for "Q8_0", the float model for
    "F16". Written by the library (bitlab_fx.export.gguf); returns {tensor: type written}."""
    from bitlab_fx.export.gguf import write_gguf as library_write

    if kind == "F16":
        return library_write(model, path, tokenizer, float_type="F16")
    return bfx.export_gguf(model, path, tokenizer, ternary_type=kind if kind.startswith("TQ") else "TQ2_0")


def llama_cpp_speed(path: str, prompt: list, new_tokens: int, prefill_ids: list, threads: int, repeats: int) -> dict:
    """Greedy decode tokens/s (after the prompt) and prefill tokens/s of a GGUF in llama.cpp; medians."""
    llm = bfx.load_llama_cpp(path, n_ctx=max(len(prompt) + new_tokens, len(prefill_ids)) + 8, n_threads=threads,
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


def onnxruntime_speed(path: str, prompt, new_tokens: int, prefill_ids, threads: int) -> dict:
    """Greedy decode tokens/s (after the prompt: (N - 1) / (t(N tokens) - t(1 token)), as for the torch runtimes)
    and prefill tokens/s (one step over the prefill ids, empty cache) of a bfx.export_onnx_decoder file."""
    from bitlab_fx.export import OnnxDecoder

    decoder = OnnxDecoder(path, threads=threads)
    t0 = time.perf_counter()
    decoder.greedy(prompt, 1)
    t1 = time.perf_counter()
    tokens = decoder.greedy(prompt, new_tokens)
    tn = time.perf_counter()
    t2 = time.perf_counter()
    decoder.prompt_logits(prefill_ids)
    t3 = time.perf_counter()
    return {"decode": (new_tokens - 1) / ((tn - t1) - (t1 - t0)), "prefill": prefill_ids.shape[1] / (t3 - t2),
            "tokens": tokens[0, prompt.shape[1]:].tolist()}
