"""What the exporters read from a converted model: each quantized layer's integer codes and steps.

A converted layer (:class:`~bitlab_fx.nn.quantized.QuantizedLinear` and the convs) stores its weight
packed; the exporters want it as ``codes`` (int8 ``[N, K]``, ``W = codes * step``) with one fp32 step per
row and group of ``group`` input columns (``steps``: ``[N, K // group]``), whatever the granularity
(per tensor, per channel, per group). Both formats re-block these codes; nothing is re-quantized.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ExportError
from ..nn.quantized import QuantizedConv2d, QuantizedLinear, _QuantizedBase
from ..quant.fake_quant import _FakeQuant
from ..quant.formats import WEIGHT_FORMATS


@dataclass
class LayerWeight:
    """One converted layer's weight as codes and steps (``W[n, k] = codes[n, k] * steps[n, k // group]``)."""

    name: str  # the original module path, e.g. "model.layers.0.self_attn.q_proj"
    weight_format: str  # "ternary" | "int4" | "int8"
    codes: torch.Tensor  # int8 [N, K]: K = all input features of a row (in_features, or C/groups*kh*kw)
    steps: torch.Tensor  # fp32 [N, K // group]
    bias: torch.Tensor | None  # fp32 [N] or None
    weight_shape: tuple  # the layer's weight shape ([N, K] for a linear, [N, C, kh, kw] for a conv)
    packed_ternary: torch.Tensor | None = None  # uint8 [N, K_pad / 4] in bitlab's packed layout (ternary)

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.steps.shape[1]

    def dequantized(self) -> torch.Tensor:
        """The float weight the converted op computes with, in the layer's weight shape."""
        dense = self.codes.float().reshape(self.codes.shape[0], -1, self.group) * self.steps[:, :, None]
        return dense.reshape(self.weight_shape)

    def rows(self, order: torch.Tensor) -> LayerWeight:
        """The same layer with its output rows (and steps, bias) taken in ``order``."""
        bias = None if self.bias is None else self.bias[order]
        return LayerWeight(self.name, self.weight_format, self.codes[order], self.steps[order], bias,
                           self.weight_shape, None if self.packed_ternary is None else self.packed_ternary[order])


def layer_weight(container: _QuantizedBase) -> LayerWeight:
    """Codes and steps of one converted layer."""
    return stored_layer_weight(container.name, container.weight_format, container.stored_weight,
                               container.weight_scale, tuple(container.weight_shape), container.bias)


def stored_layer_weight(name: str, weight_format: str, stored: torch.Tensor, weight_scale: torch.Tensor,
                        weight_shape: tuple, bias: torch.Tensor | None = None) -> LayerWeight:
    """Codes and steps of a stored weight (a container's buffer, or the same tensors read back from a file)."""
    n, k = weight_shape[0], math.prod(weight_shape[1:])
    codes = WEIGHT_FORMATS[weight_format].load(stored, k).reshape(n, k)
    scale = weight_scale.detach().float()
    steps = scale.reshape(n, -1) if scale.numel() > 1 else scale.reshape(1, 1).expand(n, 1)  # per tensor: one
    bias = None if bias is None else bias.detach().float()
    packed = stored if weight_format == "ternary" else None
    return LayerWeight(name, weight_format, codes, steps.contiguous(), bias, tuple(weight_shape), packed)


def check_converted(model: torch.nn.Module, fmt: str) -> None:
    """Raise :class:`ExportError` unless ``model`` is a converted model (fake quant left, or no bitlab layer)."""
    if any(isinstance(m, _FakeQuant) for m in model.modules()):
        raise ExportError(f"{fmt} export needs a converted model, and this one is prepared (it still has fake-quant "
                          "modules): call bfx.convert(prepared.eval()) first and export what it returns")
    if not any(isinstance(m, (QuantizedLinear, QuantizedConv2d)) for m in model.modules()):
        raise ExportError(f"{fmt} export needs a model converted by bitlab_fx, and this one has no quantized layer: "
                          "run bfx.prepare_qat(model, qconfig) (train or calibrate) and bfx.convert(...) first; "
                          "a float model exports with the runtime's own tools (convert_hf_to_gguf.py, "
                          "torch.onnx.export)")
    coded = [m.name or path for path, m in model.named_modules()
             if isinstance(m, _QuantizedBase) and m.bias_kind not in ("none", "float")]
    if coded:
        raise ExportError(f"{fmt} export does not write integer biases yet: layer(s) {', '.join(map(repr, coded[:5]))} "
                          "add their IntBias as integer codes to the integer sums (int32 codes, or made per token); "
                          "convert a model whose rules have no bias=IntBias(...) (a float bias) to export it")
    low_bit = [m.name or path for path, m in model.named_modules() if isinstance(m, _QuantizedBase) and m.act_bits != 8]
    if low_bit:
        raise ExportError(f"{fmt} export does not write activation codes of fewer than 8 bits yet: layer(s) "
                          f"{', '.join(map(repr, low_bit[:5]))} quantize their input with a dynamic quantizer of "
                          "fewer bits (act_bits); convert a model whose input quantizers are int8 or static to export it")


def converted_layers(model: torch.nn.Module) -> dict[str, _QuantizedBase]:
    """{module path of the container in ``model``: container} for every converted layer."""
    return {path: m for path, m in model.named_modules() if isinstance(m, _QuantizedBase)}
