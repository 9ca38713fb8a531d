"""Capture a whole model and prepare it: the fx frontend (whole, or partial when it does not trace whole)
and the export frontend. Used by ``prepare_qat`` and ``load_quantized``; the passes for each graph are
in :mod:`bitlab_fx.passes.pipeline`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import fx, nn

from .capture import first_line, trace_export, trace_fx
from .errors import CaptureError
from .mapping import QConfigMapping
from .capture.outside_reads import layers_read_outside
from .capture.partial import plan_partial, record_calls, short_reason
from .partial import keep_float, prepare_partial
from .passes._common import bitlab_meta
from .passes.embeddings import prepare_embeddings, reject_embedding_rules
from .passes.experts import prepare_experts, reject_experts_rules
from .passes.normalize_export import normalize_export
from .passes.pipeline import prepare_graph


def capture_fx(model: nn.Module, mapping: QConfigMapping, example_inputs, partial: bool,
               example_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Whole-model fx trace, prepared; when it fails and ``partial``, the model with its traceable parts prepared.
    Embeddings that rules name and the experts of mixture-of-experts layers are swapped for their prepared form
    first (``passes.embeddings``, ``passes.experts``)."""
    mapping = mapping.with_claimed(prepare_embeddings(model, mapping) | prepare_experts(model, mapping))
    try:
        gm = trace_fx(model, example_inputs, none_defaults=True, example_kwargs=example_kwargs)
    except CaptureError as e:
        if not partial:
            raise
        prepared = _prepare_partially(model, mapping, example_inputs, example_kwargs,
                                      short_reason(first_line(e.__cause__ or e)))
        if prepared is None:
            raise
        return prepared
    if partial and carries_behaviour(model):  # keep the class (.logits, labels=, generate...): prepare its parts
        prepared = _prepare_partially(model, mapping, example_inputs, example_kwargs, KEPT_CLASS.format(
            type(model).__name__))
        if prepared is not None:
            return prepared
    return prepare_graph(gm, mapping, {"qconfig": mapping, "frontend": "fx"})


KEPT_CLASS = ("traces whole, kept as the {} it is (a Hugging Face model: .logits, labels=, .config, "
              "save_pretrained, generate); its submodules are the traced parts (frontend='fx_whole': one GraphModule)")


def carries_behaviour(model: nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel``: its class (output objects, losses, ``generate``, ``save_pretrained``) is
    lost in a GraphModule, so a whole-model trace keeps the model and prepares its parts instead."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _prepare_partially(model: nn.Module, mapping: QConfigMapping, example_inputs, example_kwargs,
                       root_reason: str) -> Optional[nn.Module]:
    """The model with its traceable parts prepared (``bitlab_fx.partial``), or None when no part has a layer.
    Lone layers whose weight the model code needs outside their call are kept float (``capture.outside_reads``)."""
    was_training = model.training
    calls = record_calls(model.eval(), example_inputs, example_kwargs)
    plan = plan_partial(model, calls)
    model.train(was_training)
    if not plan.graphs and not plan.layers:
        return None
    prepared = prepare_partial(model, mapping, plan, root_reason)
    if example_inputs is None and not example_kwargs:
        return prepared
    record = bitlab_meta(prepared)
    lone = {path: prepared.get_submodule(path) for path, kind in record.parts.items() if kind == "layer"}
    prepared.eval()
    try:
        read = layers_read_outside(lone, lambda: prepared(*(example_inputs or ()), **(example_kwargs or {})))
    finally:
        prepared.train(was_training)
    for path, where in read.items():
        keep_float(prepared, path, plan.layers[path], f"its weight is read outside its layer call ({where}): "
                   "quantizing it would train that read in float and break it after convert; left float")
    return prepared


def capture_export(model: nn.Module, mapping: QConfigMapping, example_inputs, dynamic_shapes,
                   example_kwargs: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    """``torch.export`` capture (non-strict), prepared."""
    reject_embedding_rules(model, mapping, "frontend='export'")
    reject_experts_rules(model, mapping, "frontend='export'")
    gm = trace_export(model, example_inputs, dynamic_shapes, example_kwargs)
    return prepare_graph(gm, mapping, {"qconfig": mapping, "frontend": "export"},
                         normalizer=lambda g: normalize_export(g, model))
