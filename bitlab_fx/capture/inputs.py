"""Example inputs: checking ``example_kwargs`` against ``forward``, parameters traced as the constant None, and
the guard that raises when such a parameter is given after all.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

from torch import fx, nn

from ..errors import CaptureError, ConfigError


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


def none_default_params(model: nn.Module, example_inputs: Optional[tuple],
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


def _not_given(value, name: str) -> None:
    """Graph guard for a forward parameter traced as None (replaces torch.fx's ``_assert_is_none``)."""
    if isinstance(value, fx.Proxy):  # re-tracing the graph (unpickling a GraphModule): keep the guard as a node
        return value.tracer.create_proxy("call_function", _not_given, (value, name), {})
    if value is not None:
        raise CaptureError(
            f"the model was captured without {name!r} (traced as None, its default, because neither example_inputs "
            f"nor example_kwargs included it), so the graph cannot use it: pass it to prepare_qat "
            f"(e.g. example_kwargs={{{name!r}: ...}}), or call the model without it")


def guard_none_inputs(gm: fx.GraphModule, concrete: Dict[str, None]) -> None:
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
