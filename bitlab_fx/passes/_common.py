"""What passes share: the per-layer record kept in ``node.meta["bitlab"]``, the per-model :class:`Record`,
and small graph helpers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from torch import fx, nn

from ..config import QuantConfig
from ..layer_kinds import LAYER_KINDS
from ..mapping import Rule

META = "bitlab"  # key in node.meta: the LayerMeta of a layer call
RECORD_KEY = "bitlab_fx"  # key in GraphModule.meta: the model's Record
ROOT_ATTR = "_bitlab_fx"  # attribute of a partially traced model's root module: its Record


@dataclass
class Record:
    """What bitlab_fx records on a model it prepared or converted: ``gm.meta["bitlab_fx"]`` of a graph, or the
    ``_bitlab_fx`` attribute of a partially traced model's root."""

    stage: str  # "capturing" | "prepared" | "converted"
    frontend: str = "fx"  # "fx" | "export"
    qconfig: Any = None  # the QConfigMapping (whole models and the root of partial ones)
    prefix: str = ""  # a traced part of a partial model: its path in the model
    layer_type: Optional[str] = None  # a lone layer prepared as its own graph: its type name
    skipped: Dict[str, str] = field(default_factory=dict)  # layer calls left float, unsupported: why
    parts: Optional[Dict[str, str]] = None  # partial root: path -> "graph" | "layer"
    untraced: Dict[str, str] = field(default_factory=dict)  # partial root: module path -> first line of why
    float_layers: Dict[str, str] = field(default_factory=dict)  # partial root: lone layers kept float -> rule


@dataclass
class LayerMeta:
    """One quantizable layer call in the normalized graph."""

    fqn: str  # the original module's fully-qualified name (or the weight's, for functional calls)
    object_type: Any  # nn.Linear, nn.Conv2d, F.linear, F.conv2d ... (what set_object_type matches)
    op: str  # "linear" | "conv1d" | "conv2d"
    weight: str  # get_attr target of the weight
    bias: Optional[str]  # get_attr target of the bias
    config: Optional[QuantConfig] = None
    rule: Optional[Rule] = None
    notes: List[str] = field(default_factory=list)
    input_from: Optional[str] = None  # "uint4 from 'relu1'": the input arrives quantized by an upstream output quantizer
    input_scale: Optional[str] = None  # where the input scale comes from: "own input=static", "'relu1' via max_pool2d"
    container: Optional[str] = None  # set by convert: path of the QuantizedLinear/QuantizedConv2d
    transposed: bool = False  # the stored weight is [in, out] (HF GPT-2 Conv1D); the graph reads it via torch.t

    @property
    def token_dims(self) -> int:
        """Trailing dims of one token: a row for linear layers, one sample ``[C, L]``/``[C, H, W]`` for convs."""
        return LAYER_KINDS[self.op].token_dims


def layer_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """Nodes that carry a :class:`LayerMeta` (the layers prepare_qat saw), in graph order."""
    for node in gm.graph.nodes:
        if isinstance(node.meta.get(META), LayerMeta):
            yield node


def _as_record(value) -> Optional[Record]:
    if isinstance(value, dict) and "stage" in value:  # a model pickled when the record was a plain dict
        return Record(**{k: v for k, v in value.items() if k in Record.__dataclass_fields__})
    return value if isinstance(value, Record) else None


def bitlab_meta(model: nn.Module) -> Optional[Record]:
    """The :class:`Record` of a prepared/converted model (``gm.meta["bitlab_fx"]`` or the root attribute), or None."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and RECORD_KEY in meta:
        record = _as_record(meta[RECORD_KEY])
        if record is not None:
            meta[RECORD_KEY] = record
            return record
    if isinstance(model, nn.Module) and ROOT_ATTR in model.__dict__:
        record = _as_record(model.__dict__[ROOT_ATTR])
        if record is not None:
            model.__dict__[ROOT_ATTR] = record
            return record
    return None


def stage_of(model: nn.Module) -> Optional[str]:
    record = bitlab_meta(model)
    return None if record is None else record.stage


def layer_weight(gm: nn.Module, meta: LayerMeta):
    """The layer's weight in ``F.linear``/``F.conv2d`` orientation (``[out, in, ...]``)."""
    w = gm.get_parameter(meta.weight)
    return w.t() if meta.transposed else w


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored ``[in, out]``."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and hasattr(module, "nf")


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


# views of the one table of layer kinds (bitlab_fx/layer_kinds.py)
FUNCTIONALS = {k.functional: k.name for k in LAYER_KINDS.values()}
MODULES = {k.module: k.name for k in LAYER_KINDS.values()}
CONV_DIMS = {k.name: k.spatial_dims for k in LAYER_KINDS.values() if k.spatial_dims}  # spatial dims of each conv op
CONV_FUNCTIONALS = {k.name: k.functional for k in LAYER_KINDS.values() if k.spatial_dims}


def ntuple(v, n: int) -> tuple:
    """``v`` (an int or a sequence) as a tuple of ``n`` ints, like ``nn.modules.utils._ntuple``."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
