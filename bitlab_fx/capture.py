"""Capturing a model as a graph: the only module that calls ``torch.fx.symbolic_trace``/``torch.export``.

Failures become a :class:`CaptureError` that names the innermost module being traced when tracing
failed and the first line of why.
"""
from __future__ import annotations

import inspect
import os
import traceback
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from .errors import CaptureError, ConfigError
from .layer_kinds import LAYER_KINDS
from .passes._common import is_hf_conv1d
from .passes._modes import follow_mode


class _RecordingTracer(fx.Tracer):
    """A plain fx tracer that remembers which module it was inside, for error messages."""

    def __init__(self):
        super().__init__()
        self.stack: List[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_hf_conv1d(m):  # HF GPT-2 Conv1D: one node, normalize reads its [in, out] weight transposed
            return True
        # subclasses of a quantizable layer type that keep its forward stay one node, like the originals
        for kind in LAYER_KINDS.values():
            if isinstance(m, kind.module) and type(m).forward is kind.module.forward:
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


_INTERNAL = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame outside torch and bitlab_fx (the user's line), else the innermost one."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not any(path.startswith(d + os.sep) for d in _INTERNAL):
            return frame
    return frames[-1] if frames else None


def check_example_inputs(model: nn.Module, example_inputs: Any, example_kwargs: Any,
                         where: str = "prepare_qat") -> Tuple[Optional[tuple], Optional[dict]]:
    """Validate ``example_kwargs`` against ``model.forward`` and return ``(example_inputs, example_kwargs)``
    normalized: an empty dict is None, and ``example_inputs`` is ``()`` when only keywords are given."""
    if example_kwargs is None:
        return example_inputs, None
    if not isinstance(example_kwargs, dict):
        raise ConfigError(f"{where}: example_kwargs must be a dict of keyword inputs of forward, e.g. "
                          f"{{'attention_mask': mask}}; got {type(example_kwargs).__name__}")
    if not example_kwargs:
        return example_inputs, None
    if example_inputs is None:
        example_inputs = ()
    elif not isinstance(example_inputs, tuple):
        raise ConfigError(f"{where}: example_inputs must be a tuple of positional model inputs, e.g. (x,); "
                          f"got {type(example_inputs).__name__}")
    bad = [k for k in example_kwargs if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: example_kwargs keys must be parameter names of forward (str); got {bad[0]!r}")
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return example_inputs, dict(example_kwargs)  # no signature to check against: let the call decide
    by_name = {p.name: p for p in params}
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    listed = ", ".join(("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
                       for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in example_kwargs:
        p = by_name.get(key)
        if p is None or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if var_keyword and p is None:
                continue  # forward(**kwargs) takes it
            raise ConfigError(f"{where}: example_kwargs key {key!r} is not a parameter of "
                              f"{type(model).__name__}.forward({listed})")
        if p.kind is p.POSITIONAL_ONLY:
            raise ConfigError(f"{where}: example_kwargs key {key!r} is a positional-only parameter of "
                              f"{type(model).__name__}.forward({listed}): pass it in example_inputs")
        if p in positional and (positional.index(p) < len(example_inputs)):
            raise ConfigError(f"{where}: {key!r} is given twice, in example_inputs (position "
                              f"{positional.index(p)}) and in example_kwargs; {type(model).__name__}.forward({listed}) "
                              "takes it once: drop it from one of them")
    return example_inputs, dict(example_kwargs)


def _none_defaults(model: nn.Module, example_inputs: Optional[tuple],
                   example_kwargs: Optional[dict] = None) -> Dict[str, None]:
    """Parameters of ``forward`` that default to None and are given neither in ``example_inputs`` (positional) nor
    in ``example_kwargs``: traced as the constant None (torch.fx ``concrete_args``), so ``if mask is not None:``
    takes the branch a call without them takes. Without example inputs, the parameters without a default are
    the inputs."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = set(example_kwargs or ())
    if example_inputs is not None or keywords:
        given = len(example_inputs or ())
    else:
        given = max(1, sum(p.default is inspect.Parameter.empty for p in positional))
    return {p.name: None for i, p in enumerate(params)
            if p.default is None and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in keywords and not (p in positional and positional.index(p) < given)}


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


def _not_given(value, name: str) -> None:
    """Graph guard for a forward parameter traced as None (replaces torch.fx's ``_assert_is_none``)."""
    if isinstance(value, fx.Proxy):  # re-tracing the graph (unpickling a GraphModule): keep the guard as a node
        return value.tracer.create_proxy("call_function", _not_given, (value, name), {})
    if value is not None:
        raise CaptureError(
            f"the model was captured without {name!r} (traced as None, its default, because neither example_inputs "
            f"nor example_kwargs included it), so the graph cannot use it: pass it to prepare_qat "
            f"(e.g. example_kwargs={{{name!r}: ...}}), or call the model without it")


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
    ``.train()``/``.eval()`` (see :mod:`bitlab_fx.passes._modes`). When the two traces differ in structure
    (``if self.training:`` around other code) the graph keeps the mode the model is in, with a warning.
    ``none_defaults``: trace forward parameters that default to None and are neither in ``example_inputs`` nor in
    ``example_kwargs`` as None.
    """
    concrete = _none_defaults(model, example_inputs, example_kwargs) if none_defaults else {}
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
    _guard_none_inputs(gm, concrete)
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


def _guard_none_inputs(gm: fx.GraphModule, concrete: Dict[str, None]) -> None:
    """torch.fx guards a parameter traced as None with an ``_assert_is_none``: raise a bitlab error instead; and
    give its placeholder back the parameter's name (fx calls it ``mask_1``), so ``gm(x, mask=None)`` works."""
    changed = False
    names = {n.name for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.target, str) and node.target.rpartition("_")[0] in concrete:
            name = node.target.rpartition("_")[0]
            if name not in names:
                node.target, changed = name, True
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            value, msg = node.args[0], str(node.args[1])
            node.target, node.args = _not_given, (value, msg.split(" has been specialized")[0])
            changed = True
    if changed:
        gm.recompile()


def _batch_dynamic(example_inputs: tuple, example_kwargs: Optional[dict] = None, model: Optional[nn.Module] = None):
    """``dynamic_shapes`` marking dim 0 of every tensor input ``Dim.AUTO`` (dynamic unless the model fixes it).

    With ``example_kwargs``, a dict keyed by forward's parameter names, as ``torch.export.export`` binds
    ``(*args, **kwargs)`` to the signature (``*args`` maps to a tuple, ``**kwargs`` to a dict)."""
    def spec(x):
        return {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() >= 1 else None

    def specs(a):
        return torch.utils._pytree.tree_map(spec, a) if not isinstance(a, torch.Tensor) else spec(a)

    if not example_kwargs:
        return tuple(specs(a) for a in example_inputs)
    bound = inspect.signature(model.forward).bind(*example_inputs, **example_kwargs).arguments
    return {name: specs(value) for name, value in bound.items()}


class ShapeGuards(nn.Module):
    """Wraps ``torch.export``'s input guards (``_guards_fn``): a raw ``Guard failed: input.size()[0] == 4``
    becomes a :class:`CaptureError` that says which shapes the model was captured for and what to do."""

    def __init__(self, guards: nn.Module, shapes: str):
        super().__init__()
        self.guards, self.shapes = guards, shapes

    def forward(self, *args, **kwargs):
        try:
            return self.guards(*args, **kwargs)
        except AssertionError as e:
            raise CaptureError(
                f"the model was captured by torch.export for inputs of shape {self.shapes} and this call does not fit "
                f"({first_line(e)}): dimensions that the model's code (or a size-1 example) fixes stay static. Pass "
                "prepare_qat(..., dynamic_shapes=...) as to torch.export.export (e.g. ({0: torch.export.Dim('batch')},), "
                "or a dict keyed by forward's parameter names when example_kwargs are used), "
                "example_inputs with a batch of 2 or more, or call with the captured shapes") from e


def _shapes(example_inputs: tuple, example_kwargs: Optional[dict] = None) -> str:
    def shapes(tree, prefix=""):
        leaves = torch.utils._pytree.tree_leaves(tree)
        return [prefix + str(tuple(x.shape)) for x in leaves if isinstance(x, torch.Tensor)]
    out = shapes(example_inputs)
    for name, value in (example_kwargs or {}).items():
        out += shapes(value, f"{name}=")
    return ", ".join(out) or "()"


def trace_export(model: nn.Module, example_inputs: tuple, dynamic_shapes: Optional[Any] = None,
                 example_kwargs: Optional[dict] = None) -> fx.GraphModule:
    """``torch.export.export(strict=False)`` then ``.module()``: an fx GraphModule of aten ops whose
    ``get_attr`` targets keep the parameter names and whose nodes carry ``nn_module_stack``.

    Without ``dynamic_shapes``, dim 0 (the batch) of each tensor input is ``Dim.AUTO``: dynamic unless the model
    (or a batch of 1) fixes it; when export refuses that, the shapes are static as given. ``example_kwargs`` are
    keyword inputs (``torch.export.export(..., kwargs=)``); the default covers their tensors too."""
    if example_inputs is None and example_kwargs:
        example_inputs = ()
    if not isinstance(example_inputs, tuple):
        raise CaptureError("prepare_qat(frontend='export') needs example_inputs as a tuple, e.g. (x,) "
                           "(and/or example_kwargs, a dict of keyword inputs)")
    kwargs = example_kwargs or None
    ep = None
    if dynamic_shapes is None:
        try:
            ep = torch.export.export(model, example_inputs, kwargs,
                                     dynamic_shapes=_batch_dynamic(example_inputs, kwargs, model), strict=False)
        except Exception:
            ep = None  # static shapes, below
    if ep is None:
        try:
            ep = torch.export.export(model, example_inputs, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:
            raise CaptureError(f"torch.export could not capture {type(model).__name__}: {first_line(e)}. "
                               "Use the default frontend='fx' (it traces what it can and keeps the rest eager), "
                               "or fix the export error (see torch.export's message)") from e
    gm = ep.module()
    guards = getattr(gm, "_guards_fn", None)
    if isinstance(guards, nn.Module):
        gm._guards_fn = ShapeGuards(guards, _shapes(example_inputs, kwargs))
    return gm
