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
from .capture.partial import plan_partial, record_calls, short_reason
from .partial import prepare_partial
from .passes.embeddings import prepare_embeddings, reject_embedding_rules
from .passes.normalize_export import normalize_export
from .passes.pipeline import prepare_graph


def capture_fx(model: nn.Module, mapping: QConfigMapping, example_inputs, partial: bool,
               example_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Whole-model fx trace, prepared; when it fails and ``partial``, the model with its traceable parts prepared.
    Embeddings that rules name are swapped for their prepared form first (``passes.embeddings``)."""
    mapping = mapping.with_claimed(prepare_embeddings(model, mapping))
    try:
        gm = trace_fx(model, example_inputs, none_defaults=True, example_kwargs=example_kwargs)
    except CaptureError as e:
        if not partial:
            raise
        was_training = model.training
        calls = record_calls(model.eval(), example_inputs, example_kwargs)
        plan = plan_partial(model, calls)
        model.train(was_training)
        if not plan.graphs and not plan.layers:
            raise
        return prepare_partial(model, mapping, plan, short_reason(first_line(e.__cause__ or e)))
    return prepare_graph(gm, mapping, {"qconfig": mapping, "frontend": "fx"})


def capture_export(model: nn.Module, mapping: QConfigMapping, example_inputs, dynamic_shapes,
                   example_kwargs: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    """``torch.export`` capture (non-strict), prepared."""
    reject_embedding_rules(model, mapping, "frontend='export'")
    gm = trace_export(model, example_inputs, dynamic_shapes, example_kwargs)
    return prepare_graph(gm, mapping, {"qconfig": mapping, "frontend": "export"},
                         normalizer=lambda g: normalize_export(g, model))
