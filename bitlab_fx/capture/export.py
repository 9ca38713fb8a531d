"""The export frontend: ``torch.export.export(strict=False)`` with a dynamic batch dim by default, and shape
guards whose failures say which shapes the model was captured for.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import fx, nn

from ..errors import CaptureError
from .fx import first_line


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
