"""Shared calls for sibling layers that eager code calls one by one (an attention module that is not traced).

An HF attention module calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` and later ``o_proj(attn)``; each is a
converted layer of its own. :class:`SiblingCalls` watches the first calls to learn which members receive the
very same tensor one after the other (q, k, v here; k and v only in cross-attention), then answers the first
member of such a run with one op call over the run's rows (:meth:`FusedLinears.rows_call`) and keeps the
others' outputs for their calls on that same tensor. Any other call (another tensor, a member called twice, a
changed tensor) computes again, so outputs are always those of the member's own call; a tensor is "the same"
when it is the same object at the same version (inference-mode tensors have no version: they must not be
changed in place between the calls, which model code does not do).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .fused import FusedLinears


class SiblingCalls:
    """The call sharing of one :class:`FusedLinears` group (see the module docstring)."""

    def __init__(self, fused: FusedLinears):
        self.fused = fused
        self.runs: Optional[Dict[int, Tuple[int, int]]] = None  # member -> (first, last) of its run, once learned
        self._seen: List[Tuple[int, torch.Tensor]] = []  # (member, input) of the calls watched so far
        self._kept = None  # (input, its version, {member: output}) of the last shared call

    def __call__(self, index: int, x: torch.Tensor) -> torch.Tensor:
        kept = self._kept
        if kept is not None and kept[0] is x:  # a run's output computed for this very tensor
            out = kept[2].pop(index, None)
            if out is not None and (kept[1] is None or kept[1] == x._version):
                return out
        if self.runs is None:
            return self._watch(index, x)
        run = self.runs.get(index)
        if run is None:
            return self.fused.rows_call(x, index, index)[0]
        first = run[0]
        outs = self.fused.rows_call(x, *run)
        self._kept = (x, None if x.is_inference() else x._version,
                      {first + i: y for i, y in enumerate(outs) if first + i != index})
        return outs[index - first]

    def _watch(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Compute alone, and learn the runs once a member is called again (one round seen)."""
        if any(i == index for i, _ in self._seen):
            self.runs = _runs(self._seen)
            self._seen = []
            return self(index, x)
        self._seen.append((index, x))
        return self.fused.rows_call(x, index, index)[0]

    def __getstate__(self):  # never copy tensors in flight
        state = self.__dict__.copy()
        state["_seen"], state["_kept"] = [], None
        return state


def _runs(seen: List[Tuple[int, torch.Tensor]]) -> Dict[int, Tuple[int, int]]:
    """Members called one after the other on the same tensor, with consecutive indices: member -> (first, last)."""
    runs: Dict[int, Tuple[int, int]] = {}
    start = 0
    for k in range(1, len(seen) + 1):
        if k < len(seen) and seen[k][1] is seen[start][1] and seen[k][0] == seen[k - 1][0] + 1:
            continue
        if k - start >= 2:
            first, last = seen[start][0], seen[k - 1][0]
            runs.update({i: (first, last) for i in range(first, last + 1)})
        start = k
    return runs
