"""The stored weight formats, in one table: how a quantized weight is kept after ``convert``.

==========  ===============  =========================  ===================================
format      weight specs     buffer                     layout
==========  ===============  =========================  ===================================
ternary     TernaryWeight    ``packed_weight`` (uint8)  2-bit codes, K padded to 128 (packing)
int4        IntWeight(2..4)  ``packed_weight`` (uint8)  two signed nibbles per byte
int8        IntWeight(5..8)  ``qweight`` (int8)         one code per byte
==========  ===============  =========================  ===================================

Each format also names its ops (``torch.ops.bitlab.<format>_linear`` / ``<format>_conv2d``); which op a
layer kind calls with which arguments is in :mod:`bitlab_fx.layer_kinds`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .packing import pack_int4, pack_ternary, padded_k, unpack_int4, unpack_ternary
from .primitives import scale_shape


@dataclass(frozen=True)
class WeightFormat:
    name: str  # "ternary" | "int4" | "int8": also the prefix of its ops
    buffer: str  # the container buffer holding the stored weight
    pack: Optional[Callable[[torch.Tensor], torch.Tensor]]  # int8 [N, K] -> stored (None: stored as is)
    unpack: Optional[Callable[[torch.Tensor, int], torch.Tensor]]  # stored, K -> int8 [N, K]
    packed: bool  # the op needs the unpacked K (in_features / weight shape) besides the stored tensor

    def stored_bytes(self, n: int, k: int) -> int:
        """Bytes of the stored weight of ``n`` rows of ``k`` codes."""
        if self.name == "ternary":
            return n * padded_k(k) // 4
        if self.name == "int4":
            return n * ((k + 1) // 2)
        return n * k

    def store(self, wq: torch.Tensor) -> torch.Tensor:
        return wq.contiguous() if self.pack is None else self.pack(wq)

    def load(self, stored: torch.Tensor, k: int) -> torch.Tensor:
        return stored if self.unpack is None else self.unpack(stored, k)

    def op(self, kind: str):
        """``torch.ops.bitlab.<format>_<kind>.default`` (``kind``: "linear" or "conv2d")."""
        key = (self.name, kind)
        op = _OPS.get(key)
        if op is None:  # looked up once: torch.ops attribute access costs ~1 us per call of a layer
            op = _OPS[key] = getattr(torch.ops.bitlab, f"{self.name}_{kind}").default
        return op


_OPS: dict = {}


WEIGHT_FORMATS = {
    "ternary": WeightFormat("ternary", "packed_weight", pack_ternary, unpack_ternary, packed=True),
    "int4": WeightFormat("int4", "packed_weight", pack_int4, unpack_int4, packed=True),
    "int8": WeightFormat("int8", "qweight", None, None, packed=False),
}


def format_of(spec) -> WeightFormat:
    """The stored format of a weight spec: ternary, 2..4 bits packed two per byte, 5..8 bits as int8."""
    if spec.format == "ternary":
        return WEIGHT_FORMATS["ternary"]
    return WEIGHT_FORMATS["int4" if spec.bits <= 4 else "int8"]


def converted_weight_bytes(weight_shape: Tuple[int, ...], spec) -> int:
    """Bytes a converted weight and its fp32 steps take (what ``bfx.summary`` projects before convert)."""
    n, k = weight_shape[0], math.prod(weight_shape[1:])
    return format_of(spec).stored_bytes(n, k) + 4 * math.prod(scale_shape(weight_shape, spec.granularity))
