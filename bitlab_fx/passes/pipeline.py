"""The passes in order, for one captured graph: the only place that runs them.

``prepare_graph``: record -> normalize (fx or export form) -> insert fake quant -> stage "prepared".
``convert_graph``: lower to packed ops -> fuse sibling linears -> stage "converted". The whole-model and partial flows
(``bitlab_fx.pipeline``, ``bitlab_fx.partial``) call these for every graph they prepare or convert.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from torch import fx

from ..nn.direct_graph import with_direct_calls
from ._common import RECORD_KEY, Record
from .fuse_siblings import fuse_siblings
from .insert_fake_quant import insert_fake_quant
from .lower_to_packed import lower_to_packed
from .normalize import normalize


def prepare_graph(gm: fx.GraphModule, mapping: Any, record: Dict[str, Any],
                  normalizer: Optional[Callable[[fx.GraphModule], fx.GraphModule]] = normalize) -> fx.GraphModule:
    """Normalize ``gm`` (``normalizer``; None when it is already in normalized form) and insert the fake quant
    the mapping asks for; ``record`` (fields of :class:`Record`: frontend, prefix...) becomes ``gm.meta["bitlab_fx"]``."""
    gm.meta[RECORD_KEY] = Record(stage="capturing", **record)
    if normalizer is not None:
        gm = normalizer(gm)
    gm = insert_fake_quant(gm, mapping)
    gm.meta[RECORD_KEY].stage = "prepared"
    return gm


def convert_graph(gm: fx.GraphModule, fuse: bool = True) -> fx.GraphModule:
    """Lower the fake-quantized layers of a prepared graph to packed ``torch.ops.bitlab`` calls, in place; with
    ``fuse``, sibling linear layers (same input) then share one call (``fuse_siblings``)."""
    gm = lower_to_packed(gm)
    if fuse:
        gm = fuse_siblings(gm)
    gm.meta[RECORD_KEY].stage = "converted"
    return with_direct_calls(gm)  # eager CPU inference calls the linear kernels without the dispatcher
