"""Capturing a model as a graph: the only module that calls ``torch.fx.symbolic_trace``/``torch.export``.

Failures become a :class:`CaptureError` that names the innermost module being traced when tracing
failed and the first line of why.
"""
from __future__ import annotations

import traceback
from typing import Any, List, Optional

import torch
from torch import fx, nn

from .errors import CaptureError
from .passes._common import is_hf_conv1d


class _RecordingTracer(fx.Tracer):
    """A plain fx tracer that remembers which module it was inside, for error messages."""

    def __init__(self):
        super().__init__()
        self.stack: List[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_hf_conv1d(m):  # HF GPT-2 Conv1D: one node, normalize reads its [in, out] weight transposed
            return True
        # subclasses of nn.Linear/nn.Conv2d that keep their forward stay one node, like the originals
        for cls in (nn.Linear, nn.Conv2d):
            if isinstance(m, cls) and type(m).forward is cls.forward:
                return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append(name)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def trace_fx(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with a clear :class:`CaptureError` on failure."""
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # tracing runs arbitrary user code: any exception means "not traceable"
        where = tracer.stack[-1] if tracer.stack else ""
        module = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where else \
            f"the top-level {type(model).__name__}.forward"
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise CaptureError(
            f"torch.fx could not trace {module}: {first_line(e)} (at {frame.filename}:{frame.lineno}). "
            "Data-dependent control flow (if/for on tensor values) and calls fx cannot follow are the usual causes: "
            "make that code traceable, or quantize the traceable parts by passing them to prepare_qat "
            "(e.g. prepare_qat(model.encoder, ...))") from e
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def trace_export(model: nn.Module, example_inputs: tuple, dynamic_shapes: Optional[Any] = None) -> fx.GraphModule:
    """``torch.export.export(strict=False)`` then ``.module()``: an fx GraphModule of aten ops whose
    ``get_attr`` targets keep the parameter names and whose nodes carry ``nn_module_stack``."""
    if not isinstance(example_inputs, tuple):
        raise CaptureError("prepare_qat(frontend='export') needs example_inputs as a tuple, e.g. (x,)")
    try:
        ep = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {first_line(e)}. "
                           "Use the default frontend='fx' (it traces what it can and keeps the rest eager), "
                           "or fix the export error (see torch.export's message)") from e
    return ep.module()
