"""The fx frontend: ``torch.fx.symbolic_trace`` with a tracer that remembers where it failed, a second trace in
the other train/eval mode (calls whose constant arguments differ follow the mode: ``modes.ModeCall``), and
errors that name the innermost module and the user's line.
"""
from __future__ import annotations

import os
import traceback
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from ..errors import CaptureError
from ..nn.embedding import FakeQuantEmbedding
from ..nn.experts import FakeQuantExperts
from ..passes._common import is_hf_conv1d
from ..passes.layer_forms import float_reason
from ..passes.normalize import module_kind
from .inputs import guard_none_inputs, none_default_params
from .modes import follow_mode


class _RecordingTracer(fx.Tracer):
    """A plain fx tracer that remembers which module it was inside, for error messages."""

    def __init__(self):
        super().__init__()
        self.stack: List[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_hf_conv1d(m) or isinstance(m, (FakeQuantEmbedding, FakeQuantExperts)):  # HF GPT-2 Conv1D: one node,
            return True  # normalize reads its [in, out] weight transposed; prepared embeddings/experts: one node each,
            # swapped again by convert
        # subclasses of a quantizable layer type stay one node, like the originals (normalize quantizes those that
        # compute what it computes and lists the others as left float, with the reason)
        if module_kind(m) is not None or float_reason(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append(name)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


# errors of torch.fx itself whose own words do not say what is wrong with the model: what to say instead
_FX_ERRORS = {
    "code: co_varnames is too small": "forward wrapped by a (*args, **kwargs) decorator (e.g. transformers' "
                                      "deprecate_kwarg): fx cannot trace it as a graph root",
}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {_FX_ERRORS.get(line, line)}"


# frames inside torch or bitlab_fx are not the user's line
_INTERNAL = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame outside torch and bitlab_fx (the user's line), else the innermost one."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not any(path.startswith(d + os.sep) for d in _INTERNAL):
            return frame
    return frames[-1] if frames else None


def _capture_error(model: nn.Module, tracer: "_RecordingTracer", e: Exception, concrete: Dict[str, None]) -> CaptureError:
    where = tracer.stack[-1] if tracer.stack else ""
    module = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where else \
        f"the top-level {type(model).__name__}.forward"
    frame = user_frame(e)
    at = f" (at {frame.filename}:{frame.lineno})" if frame is not None else ""
    hint = ""
    if concrete:
        names = ", ".join(concrete)
        first = next(iter(concrete))
        hint = (f" It was traced with {names}=None (forward's default, not given in example_inputs or example_kwargs): "
                f"pass {'them' if len(concrete) > 1 else 'it'} (e.g. example_kwargs={{{first!r}: ...}}) to trace "
                f"{'them' if len(concrete) > 1 else 'it'} as inputs.")
    return CaptureError(
        f"torch.fx could not trace {module}: {first_line(e)}{at}.{hint} "
        "Data-dependent control flow (if/for on tensor values) and calls fx cannot follow are the usual causes: "
        "make that code traceable, or quantize the traceable parts by passing them to prepare_qat "
        "(e.g. prepare_qat(model.encoder, ...))")


def _same(x, y, env: Dict[fx.Node, fx.Node]) -> bool:
    if isinstance(x, fx.Node) or isinstance(y, fx.Node):
        return isinstance(x, fx.Node) and isinstance(y, fx.Node) and env.get(y) is x
    if isinstance(x, (tuple, list)):
        return type(x) is type(y) and len(x) == len(y) and all(_same(a, b, env) for a, b in zip(x, y))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k], env) for k in x)
    if isinstance(x, slice):
        return isinstance(y, slice) and all(_same(getattr(x, a), getattr(y, a), env) for a in ("start", "stop", "step"))
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:
        return False


_SCALAR = (bool, int, float, type(None))


def _mode_differences(graph: fx.Graph, other: fx.Graph) -> Optional[Dict[fx.Node, Tuple[dict, dict]]]:
    """Nodes of ``graph`` whose scalar constant arguments differ in ``other`` (the same forward traced in the other
    mode): ``{node: ({key: value here}, {key: value there})}``; None when the graphs differ otherwise."""
    a, b = list(graph.nodes), list(other.nodes)
    if len(a) != len(b):
        return None
    env: Dict[fx.Node, fx.Node] = {}
    found = {}
    for n, m in zip(a, b):
        if n.op != m.op or n.target != m.target or len(n.args) != len(m.args) or n.kwargs.keys() != m.kwargs.keys():
            return None
        here, there = {}, {}
        pairs = [(i, x, y) for i, (x, y) in enumerate(zip(n.args, m.args))]
        pairs += [(k, n.kwargs[k], m.kwargs[k]) for k in n.kwargs]
        for key, x, y in pairs:
            if _same(x, y, env):
                continue
            if not (isinstance(x, _SCALAR) and isinstance(y, _SCALAR)):
                return None
            here[key], there[key] = x, y
        if here:
            found[n] = (here, there)
        env[m] = n
    return found


def trace_fx(model: nn.Module, example_inputs: Optional[tuple] = None, *, none_defaults: bool = False,
             example_kwargs: Optional[dict] = None) -> fx.GraphModule:
    """``torch.fx`` symbolic trace with a clear :class:`CaptureError` on failure.

    The model is traced in train and in eval mode: calls whose constant arguments differ (``F.dropout(...,
    training=self.training)``, ``dropout_p=p if self.training else 0.0``) become modules that follow
    ``.train()``/``.eval()`` (see :mod:`bitlab_fx.capture.modes`). When the two traces differ in structure
    (``if self.training:`` around other code) the graph keeps the mode the model is in, with a warning.
    ``none_defaults``: trace forward parameters that default to None and are neither in ``example_inputs`` nor in
    ``example_kwargs`` as None.
    """
    concrete = none_default_params(model, example_inputs, example_kwargs) if none_defaults else {}
    for m in model.modules():  # check nn.Linear subclasses with their own forward now, not while fx patches calls
        module_kind(m)
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # tracing runs arbitrary user code: any exception means "not traceable"
        error = _capture_error(model, tracer, e, concrete)
        if not concrete:
            raise error from e
        try:  # e.g. forward uses the optional input unconditionally: trace it as an input, as before
            tracer, concrete = _RecordingTracer(), {}
            graph = tracer.trace(model)
        except Exception:
            raise error from e
    was_training = model.training
    other = None
    try:
        model.train(not was_training)
        other = _RecordingTracer().trace(model, concrete_args=concrete or None)
    except Exception:
        pass
    finally:
        model.train(was_training)
    differences = None if other is None else _mode_differences(graph, other)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    guard_none_inputs(gm, concrete)
    if differences is None:
        if other is not None:
            warnings.warn(
                f"{type(model).__name__}.forward branches on self.training: torch.fx captured it in "
                f"{'train' if was_training else 'eval'} mode, and the graph keeps that branch after .train()/.eval() "
                "(functional dropout in it does not follow the mode either); use nn.Dropout modules, or "
                "frontend='export'", stacklevel=3)
        return gm
    for node, (here, there) in differences.items():
        train, eval_ = (here, there) if was_training else (there, here)
        follow_mode(gm, node, train, eval_)
    gm.graph.lint()
    gm.recompile()
    return gm
