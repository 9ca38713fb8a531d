"""``bfx.compile``: ``torch.compile`` for training a prepared model on CPU.

A prepared layer keeps the int8 codes of its input for the backward, not the float input (``integer_train``; the
fake-quant layers under torch.compile keep codes too). After a ReLU, the backward then needs the ReLU's mask
``y <= 0`` and no longer has ``y`` at hand, so AOTAutograd's partitioner keeps the mask: one byte an element, the
cheapest tensor to save. On CPU that choice is slow: torch 2.13's inductor writes and reads bool tensors through
generic per-element code (``VecMask::store``/``from`` with a bool ``Vectorized``), ~5 ns an element, so a
256 x 1024 ReLU mask costs ~1.2 ms to write in the forward and ~0.4 ms to read in the backward: more than the int8
GEMM of the layer it feeds (measured in ``docs/benchmarks.md``, "QAT step").

:class:`RecomputeBoolTensors` is a joint-graph pass that marks every bool tensor the forward computes on CPU as
*recompute* (the tag ``torch.utils.checkpoint``'s selective checkpointing uses), so the partitioner keeps the float
tensor the mask is computed from and the backward recomputes the comparison, fused into the kernel that reads it.
Values and gradients are unchanged (recomputing a comparison gives the same bools; a mask of a random draw, e.g.
dropout's, is recomputed from the saved draw, never from a new one: the partitioner never recomputes random ops).
:func:`compile` is ``torch.compile`` with that pass added to inductor's options.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy

from .errors import ConfigError

_OPTION = "joint_custom_pre_pass"


def _after_tangents(graph: torch.fx.Graph) -> set:
    """The nodes of a joint graph that depend on an incoming gradient (``tangents_*`` placeholders): the backward."""
    backward: set = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or \
                any(arg in backward for arg in node.all_input_nodes):
            backward.add(node)
    return backward


def _tag_forward_bool_tensors(graph: torch.fx.Graph) -> int:
    """Tags the forward's CPU bool tensors of a joint graph ``recompute`` (see the module docstring); returns how
    many."""
    backward = _after_tangents(graph)
    tagged = 0
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op == "call_function" and node not in backward and isinstance(val, torch.Tensor) and \
                val.dtype == torch.bool and val.device.type == "cpu" and "recompute" not in node.meta:
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            tagged += 1
    return tagged


@functools.lru_cache(maxsize=None)
def _pass_class():
    """:class:`RecomputeBoolTensors`, defined on first use: its base class lives in ``torch._inductor``, whose import
    loads triton (``import bitlab_fx`` must not)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class RecomputeBoolTensors(CustomGraphPass):
        """The joint-graph pass of :func:`compile` (an inductor ``CustomGraphPass``: its ``uuid`` lets inductor
        cache the graphs it compiled with it); counts the tensors it tagged in ``tagged``."""

        def __init__(self):
            self.tagged = 0

        def __call__(self, graph: torch.fx.Graph) -> None:
            self.tagged += _tag_forward_bool_tensors(graph)

        def uuid(self) -> Optional[Any]:
            return get_hash_for_files((__file__,))

    RecomputeBoolTensors.__module__ = __name__
    return RecomputeBoolTensors


def __getattr__(name: str):
    if name == "RecomputeBoolTensors":
        return _pass_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def inductor_options(options: Optional[Dict[str, Any]] = None, mode: Optional[str] = None,
                     dynamic: Optional[bool] = None) -> Dict[str, Any]:
    """Inductor options for ``torch.compile(..., options=...)``: ``options`` (or the settings of ``mode``) with
    :class:`RecomputeBoolTensors` added to the joint-graph passes (after any the caller gave)."""
    if mode is not None and options is not None:
        raise ConfigError("bfx.compile: give mode or options, not both (torch.compile takes one; pass the mode's "
                          "settings as options, see torch._inductor.list_mode_options(mode))")
    merged = dict(torch._inductor.list_mode_options(mode, dynamic) if mode is not None else (options or {}))
    given = merged.get(_OPTION)
    passes = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
    pass_class = _pass_class()
    if not any(isinstance(p, pass_class) for p in passes):
        passes.append(pass_class())
    merged[_OPTION] = passes[0] if len(passes) == 1 else passes
    return merged


def compile(model, *, fullgraph: bool = False, dynamic: Optional[bool] = None, mode: Optional[str] = None,
            options: Optional[Dict[str, Any]] = None, **kwargs):
    """``torch.compile(model, ...)`` for training a prepared model on CPU with inductor: the same arguments, with the
    joint-graph pass that keeps ReLU-style masks out of the saved tensors (see the module docstring; 1.3-1.5x
    faster steps on a ternary ReLU MLP). Another ``backend`` is passed through unchanged."""
    from .ops.cpu import kernel_library
    kernel_library()  # load (or build) the C kernel now: a trace cannot, and takes its quantizer ops only if loaded
    backend = kwargs.pop("backend", "inductor")
    if backend != "inductor":
        return torch.compile(model, fullgraph=fullgraph, dynamic=dynamic, mode=mode, options=options,
                             backend=backend, **kwargs)
    return torch.compile(model, fullgraph=fullgraph, dynamic=dynamic,
                         options=inductor_options(options, mode, dynamic), **kwargs)
