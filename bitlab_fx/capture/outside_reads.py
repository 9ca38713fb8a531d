"""Weights read outside their layer call: a lone layer of a partially traced model (its own prepared graph) whose
``weight``/``bias`` eager model code also reads directly (Mamba's mixer: ``self.conv1d.weight``,
``self.dt_proj.weight @ x``).

Such a read sees the float weight while the layer call sees the quantized one, and after ``convert`` it would see
the converted layer's empty stand-in. :func:`layers_read_outside` finds them with ``example_inputs``: one run records
the reads made outside the layers' own calls; a second run gives those reads what ``convert`` leaves (an empty tensor
of the same dtype); layers whose model then fails or changes its outputs (tried one line of code at a time) are returned, to be kept float with the
reason. Reads of metadata only (``layer.weight.dtype``, as T5 does) pass the second run: the layer is quantized.
"""
from __future__ import annotations

import linecache
import os
import sys
from typing import Callable, Dict

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

_HERE = os.path.dirname(os.path.abspath(__file__))


class _Probe:
    """Watches the ``weight``/``bias`` reads of lone-layer graphs made outside their own forward."""

    def __init__(self, layers: Dict[str, fx.GraphModule]):
        self.layers = layers
        self.depth = {path: 0 for path in layers}
        self.reads: Dict[str, str] = {}  # path -> where the first outside read is (file:line: code)
        self.empty = set()  # paths whose outside reads get an empty tensor (as after convert)
        self.handles = []

    def __enter__(self):
        for path, gm in self.layers.items():
            self._watch(path, gm)
        return self

    def _watch(self, path: str, gm: fx.GraphModule) -> None:
        probe, cls = self, type(gm)  # each GraphModule instance has a class of its own
        own = cls.__dict__.get("__getattr__")

        def getattr_(module, name):
            value = torch.nn.Module.__getattr__(module, name)
            if name in module._parameters and probe.depth[path] == 0:
                probe.reads.setdefault(path, _caller())
                if path in probe.empty:
                    return torch.empty(0, dtype=value.dtype, device=value.device)
            return value

        cls.__getattr__ = getattr_
        self.handles.append(lambda: setattr(cls, "__getattr__", own) if own else delattr(cls, "__getattr__"))
        self.handles.append(gm.register_forward_pre_hook(lambda m, a: self._enter(path)).remove)
        self.handles.append(gm.register_forward_hook(lambda m, a, o: self._leave(path), always_call=True).remove)

    def _enter(self, path):
        self.depth[path] += 1

    def _leave(self, path):
        self.depth[path] -= 1

    def __exit__(self, *exc):
        for undo in reversed(self.handles):
            undo()


def _caller() -> str:
    """``file:line: code`` of the innermost frame outside this file (the model code that read the weight)."""
    frame = sys._getframe(2)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _HERE:
        frame = frame.f_back
    if frame is None:
        return "?"
    code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}: {code}"


def _same(a, b) -> bool:
    a, b = tree_flatten(a)[0], tree_flatten(b)[0]
    return len(a) == len(b) and all(
        (torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and torch.allclose(x, y, atol=1e-5))
        or (not torch.is_tensor(x) and not torch.is_tensor(y)) for x, y in zip(a, b))


def layers_read_outside(layers: Dict[str, fx.GraphModule], run: Callable[[], object]) -> Dict[str, str]:
    """``{path: where}`` for the lone layers whose weight model code reads outside their call and needs (the model
    fails or changes without it, as after convert); ``run()`` calls the model on the example inputs. Layers read
    from the same line of code are tried together (one run per line)."""
    if not layers:
        return {}
    needed: Dict[str, str] = {}
    with _Probe(layers) as probe, torch.no_grad():
        reference = run()
        sites: Dict[str, list] = {}
        for path, where in probe.reads.items():
            sites.setdefault(where, []).append(path)
        for where, paths in sites.items():
            probe.empty = set(paths)
            try:
                ok = _same(reference, run())
            except Exception:
                ok = False
            if not ok:
                needed.update({path: where for path in paths})
    return needed
