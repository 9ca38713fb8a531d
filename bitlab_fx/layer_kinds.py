"""What bitlab_fx can quantize, in one table: the layer kinds, each with every form it takes.

Capture (leaf modules), both normalize passes (module, functional and aten forms), prepare (the exact
layer call), convert (the container and its op) and the summary read this table; to add a layer kind,
add a row here and a container in ``nn/quantized.py``. The stored weight formats are the other axis of
the table, in :mod:`bitlab_fx.quant.formats`; a container builds its op call from the two
(``_QuantizedBase.op_call``), and ``convert`` emits exactly that call.

>>> from bitlab_fx.layer_kinds import LAYER_KINDS
>>> [(k.name, k.module.__name__, k.token_dims) for k in LAYER_KINDS.values()]
[('linear', 'Linear', 1), ('conv1d', 'Conv1d', 2), ('conv2d', 'Conv2d', 3)]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .nn.quantized import QuantizedConv1d, QuantizedConv2d, QuantizedLinear
from .quant import exact_layers

aten = torch.ops.aten


@dataclass(frozen=True)
class LayerKind:
    name: str  # "linear" | "conv1d" | "conv2d": LayerMeta.op
    module: type  # the nn module (and its subclasses that keep its forward)
    functional: Callable  # the functional form every layer is normalized to
    aten: Tuple  # the aten overloads torch.export produces for it
    spatial_dims: int  # 0 for linear
    container: type  # what convert puts in its place
    exact: Callable  # the prepared call computed from the codes (quant.exact_layers)

    @property
    def token_dims(self) -> int:
        """Trailing dims one activation scale covers: a row for linear, a whole sample for convs."""
        return 1 if self.spatial_dims == 0 else self.spatial_dims + 1


LAYER_KINDS: Dict[str, LayerKind] = {k.name: k for k in (
    LayerKind("linear", nn.Linear, F.linear, (aten.linear.default,), 0, QuantizedLinear, exact_layers.linear),
    LayerKind("conv1d", nn.Conv1d, F.conv1d, (aten.conv1d.default, aten.conv1d.padding), 1, QuantizedConv1d,
              exact_layers.conv1d),
    LayerKind("conv2d", nn.Conv2d, F.conv2d, (aten.conv2d.default, aten.conv2d.padding), 2, QuantizedConv2d,
              exact_layers.conv2d),
)}

BY_MODULE = {k.module: k for k in LAYER_KINDS.values()}
BY_FUNCTIONAL = {k.functional: k for k in LAYER_KINDS.values()}
BY_ATEN = {overload: k for k in LAYER_KINDS.values() for overload in k.aten}


def supported_names() -> str:
    """``"nn.Linear, nn.Conv1d, nn.Conv2d"``: for error messages."""
    return ", ".join(f"nn.{k.module.__name__}" for k in LAYER_KINDS.values())
