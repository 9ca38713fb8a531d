"""What passes share: the per-layer record kept in ``node.meta["bitlab"]`` and small graph helpers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional

import torch.nn.functional as F
from torch import fx, nn

from ..config import QuantConfig
from ..mapping import Rule

META = "bitlab"
STAGE = "bitlab_fx"  # key in GraphModule.meta: {"stage": "prepared" | "converted", ...}


@dataclass
class LayerMeta:
    """One quantizable layer call in the normalized graph."""

    fqn: str  # the original module's fully-qualified name (or the weight's, for functional calls)
    object_type: Any  # nn.Linear, nn.Conv2d, F.linear, F.conv2d ... (what set_object_type matches)
    op: str  # "linear" | "conv2d"
    weight: str  # get_attr target of the weight
    bias: Optional[str]  # get_attr target of the bias
    config: Optional[QuantConfig] = None
    rule: Optional[Rule] = None
    notes: List[str] = field(default_factory=list)
    container: Optional[str] = None  # set by convert: path of the QuantizedLinear/QuantizedConv2d

    @property
    def token_dims(self) -> int:
        return 1 if self.op == "linear" else 3


def layer_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """Nodes that carry a :class:`LayerMeta` (the layers prepare_qat saw), in graph order."""
    for node in gm.graph.nodes:
        if isinstance(node.meta.get(META), LayerMeta):
            yield node


def stage_of(model: nn.Module) -> Optional[str]:
    meta = getattr(model, "meta", None)
    return meta.get(STAGE, {}).get("stage") if isinstance(meta, dict) else None


def unique_name(gm: nn.Module, base: str) -> str:
    """A new top-level attribute name for ``gm`` derived from ``base``."""
    name = base.replace(".", "_") or "root"
    i = 0
    candidate = name
    while hasattr(gm, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


FUNCTIONALS = {F.linear: "linear", F.conv2d: "conv2d"}
MODULES = {nn.Linear: "linear", nn.Conv2d: "conv2d"}
