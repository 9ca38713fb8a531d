"""``bfx.export_onnx_decoder``: a converted causal LM as one ONNX step with a KV cache, and greedy decoding of it.

:func:`bfx.export_onnx <bitlab_fx.export.onnx.export_onnx>` writes a decoder without a cache: every new token
would run the whole sequence again. Here the exported graph is one *step* of the model with its cache as plain
tensors, the layout onnxruntime-genai and Optimum use:

- inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq], ``position_ids`` [batch, seq] and,
  per layer ``i``, ``past_key_values.{i}.key`` / ``.value`` [batch, kv heads, past, head dim];
- outputs ``logits`` [batch, 1, vocab] (the last position's, which decoding reads; [batch, seq, vocab] with
  ``all_logits=True``) and ``present.{i}.key`` / ``.value`` (the cache after this step).

``batch``, ``seq`` and ``past`` are dynamic, so one file prefills a prompt (``past`` = 0) and then decodes one
token a step. The layers are lowered exactly as in ``export_onnx`` (``MatMulNBits`` on the converted codes).
:class:`OnnxDecoder` runs the file in onnxruntime with greedy decoding.
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import torch

from ..errors import ExportError
from .weights import check_converted

_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 5  # sizes of the example step; none 0 or 1 (torch.export fixes those)


def cache_input_names(layers: int) -> list:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def cache_output_names(layers: int) -> list:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _cache_argument(model) -> str:
    """The name under which the model's forward takes its cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ExportError(f"export_onnx_decoder: {type(model).__name__}.forward takes no KV cache (no `cache` or "
                      "`past_key_values` argument); export it without a cache with bfx.export_onnx")


def _cache_tensors(output) -> list:
    """[key 0, value 0, key 1, ...] of the cache a Hugging Face model returned."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    if cache is None:
        raise ExportError("export_onnx_decoder: the model returned no cache with use_cache=True")
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for pair in zip(cache.key_cache, cache.value_cache) for t in pair]


class CachedStep(torch.nn.Module):
    """``model``'s forward with its KV cache as flat tensors in and out (what the ONNX graph holds)."""

    def __init__(self, model: torch.nn.Module, layers: int, all_logits: bool):
        super().__init__()
        self.model, self.layers, self.all_logits = model, layers, all_logits
        self.cache_argument = _cache_argument(model)
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, attention_mask, position_ids, past: list):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        keep = {"logits_to_keep": 1} if self.keeps_logits and not self.all_logits else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_argument: cache}, **keep)
        logits = out.logits if self.all_logits else out.logits[:, -1:]
        return (logits, *_cache_tensors(out))


def _check_causal_lm(model) -> None:
    """ExportError unless ``model`` is a Hugging Face decoder-only causal LM."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
        raise ExportError(f"export_onnx_decoder: {type(model).__name__} is not a Hugging Face decoder-only causal LM "
                          "(a model with generate() and no encoder); export other models with bfx.export_onnx")


def _example_step(model) -> tuple:
    """(inputs, dynamic shapes) of an example step: batch 2, 3 new tokens after 5 cached ones (the cache the model
    itself returned for them: one key and one value per layer)."""
    from torch.export import Dim

    b, s, p = _EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST
    ids = torch.zeros(b, p + s, dtype=torch.long)
    with torch.no_grad():
        past = _cache_tensors(model(input_ids=ids[:, :p], use_cache=True))
    inputs = (ids[:, p:], torch.ones(b, p + s, dtype=torch.long), torch.arange(p, p + s).expand(b, s).contiguous(),
              list(past))
    batch, seq, cached, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, [{0: batch, 2: cached}] * len(past))
    return inputs, shapes


def export_onnx_decoder(model: torch.nn.Module, path: str, all_logits: bool = False) -> dict:
    """Write a converted Hugging Face causal LM to ``path`` as an ONNX step with a KV cache (module docstring);
    returns {layer: the ONNX nodes it became}. Run it with :class:`OnnxDecoder`. ``all_logits``: output every
    position's logits (to score text) instead of the last one's. Needs the ``export`` extra.
    """
    from . import onnx as onnx_export

    check_converted(model, "ONNX")
    model = model.eval()
    _check_causal_lm(model)
    inputs, shapes = _example_step(model)
    layers = len(inputs[3]) // 2
    step = CachedStep(model, layers, all_logits).eval()
    names = ["input_ids", "attention_mask", "position_ids", *cache_input_names(layers)]
    try:
        program = onnx_export.torch_onnx_export(step, inputs, {}, shapes, input_names=names,
                                                output_names=["logits", *cache_output_names(layers)])
    except Exception as err:
        raise ExportError(f"export_onnx_decoder: torch.onnx.export of {type(model).__name__}'s cached step failed: "
                          f"{str(err).splitlines()[0][:400]}; export without a cache with bfx.export_onnx") from err
    lowered = onnx_export.lower_and_save(program, path)
    return {name.removeprefix("model."): nodes for name, nodes in lowered.items()}  # (the wrapper's prefix)


class OnnxDecoder:
    """Greedy decoding of a file written by :func:`export_onnx_decoder` in onnxruntime.

    ``threads``: onnxruntime's intra-op threads (its default: one per core).
    """

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        specs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in specs if n.startswith("past_key_values.")]
        if not self.past_names:
            raise ExportError(f"OnnxDecoder: {path} has no past_key_values inputs; write it with "
                              "bfx.export_onnx_decoder (bfx.export_onnx files have no cache)")
        self.cache_shape = [specs[n].shape for n in self.past_names]  # [batch, kv heads, past, head dim]

    def prompt_feeds(self, ids: np.ndarray) -> dict:
        """The inputs of a step over the prompt ``ids`` [batch, seq] with an empty cache."""
        batch, seq = ids.shape
        empty = {n: np.zeros((batch, shape[1], 0, shape[3]), dtype=np.float32)
                 for n, shape in zip(self.past_names, self.cache_shape)}
        return {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64),
                "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)), **empty}

    def prompt_logits(self, input_ids) -> torch.Tensor:
        """The logits output of one step over the prompt ``input_ids`` [batch, seq] (the last position's, or every
        position's for a file written with ``all_logits=True``)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        return torch.from_numpy(self.session.run(["logits"], self.prompt_feeds(ids))[0])

    def greedy(self, input_ids: torch.Tensor, new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """The prompt ``input_ids`` [batch, seq] (no padding) followed by up to ``new_tokens`` greedy tokens;
        a batch stops when every row has produced ``eos_token_id``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ExportError(f"OnnxDecoder.greedy: input_ids must be [batch, seq] with seq >= 1, got shape "
                              f"{tuple(ids.shape)}")
        batch = ids.shape[0]
        feeds = self.prompt_feeds(ids)
        out, done = [ids], np.zeros(batch, dtype=bool)
        for _ in range(new_tokens):
            logits, *present = self.session.run(None, feeds)
            token = logits[:, -1].argmax(-1).astype(np.int64)
            out.append(token[:, None])
            if eos_token_id is not None:
                done |= token == eos_token_id
                if done.all():
                    break
            past = feeds["attention_mask"].shape[1]
            feeds = {"input_ids": token[:, None], "attention_mask": np.ones((batch, past + 1), dtype=np.int64),
                     "position_ids": np.full((batch, 1), past, dtype=np.int64), **dict(zip(self.past_names, present))}
        return torch.from_numpy(np.concatenate(out, axis=1))
