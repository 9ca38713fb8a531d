"""``BitLinear``: the BitLab-style drop-in ternary linear layer (eager, no graph capture).

Three states, as BitLab users know them:

- **train** (``layer.train()``): float weights, fake quantization in the loop (ternary absmean weights,
  int8 absmax inputs, straight-through gradients), the same fake-quant modules ``prepare_qat`` inserts,
  and the same forward values: the integer product of the codes (``quant.exact_layers``).
  No ``qweight`` attribute exists.
- **eval** (``layer.eval()``): ``qweight`` (int8 holding -1/0/1) and ``weight_scale`` are built from the
  float weight, and the forward runs the integer ``torch.ops.bitlab.int8_linear`` op. They are rebuilt if
  the float weight changes, and dropped again by ``train()``. The float weight is kept (you can go back).
  With fake quant disabled (``bfx.disable_fake_quant``) or mid warm-up (``bfx.QuantWarmup``, ``mix < 1``)
  eval computes what train mode computes (float, or the warm-up blend) instead of the integer op.
- **deployed** (``layer.deploy()``): permanent; the float weight is deleted and the layer holds a
  :class:`~bitlab_fx.nn.QuantizedLinear` (2-bit packed weight, ``torch.ops.bitlab.ternary_linear``).

>>> import torch
>>> from bitlab_fx import BitQuantConfig
>>> from bitlab_fx.nn import BitLinear
>>> layer = BitLinear(256, 64, quant_config=BitQuantConfig())
>>> hasattr(layer, "qweight")
False
>>> _ = layer.eval()
>>> layer.qweight.dtype, sorted(layer.qweight.unique().tolist()) == [-1, 0, 1]
(torch.int8, True)
>>> layer.weight_memory_bytes          # 64 rows x 256/4 bytes of 2-bit codes + one fp32 scale
4100
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import ops  # noqa: F401  (defines torch.ops.bitlab)
from ..errors import ConfigError
from ..quant import exact_layers
from ..quant import primitives as P
from ..quant.fake_quant import ActivationFakeQuant, WeightFakeQuant
from ..quant.packing import padded_k
from ..nn.quantized import QuantizedLinear
from .config import BitQuantConfig


def _as_bit_config(quant_config) -> BitQuantConfig:
    if quant_config is None:
        return BitQuantConfig()
    if not isinstance(quant_config, BitQuantConfig):
        raise ConfigError(f"BitLinear(quant_config={type(quant_config).__name__}): pass a bitlab_fx.BitQuantConfig; "
                          "for other formats use bfx.prepare_qat(model, bfx.QuantConfig(...)) on a plain nn.Linear model")
    return quant_config


class BitLinear(nn.Linear):
    """``nn.Linear`` with ternary weights and int8 (or float) inputs; see the module docstring.

    The float parameters are named ``weight`` and ``bias`` as in ``nn.Linear``, so an ``nn.Linear``
    state_dict loads into it; ``qweight``/``weight_scale`` are derived and not saved."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 quant_config: Optional[BitQuantConfig] = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quant_config = _as_bit_config(quant_config)
        self.weight_fq = WeightFakeQuant(self.quant_config.weight_spec, layer="BitLinear")
        a = self.quant_config.activation_spec
        self.input_fq = None if a is None else ActivationFakeQuant(a, token_dims=1, layer="BitLinear")
        self.weight_fq.hand_over = True  # the exact layer call reuses their codes
        if self.input_fq is not None:
            self.input_fq.hand_over = True
        self.act = "none" if a is None else a.granularity
        self.deployed: Optional[QuantizedLinear] = None
        self._qweight_key = None

    # -- modes ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "BitLinear":
        super().train(mode)
        if self.deployed is None:
            self._quantize_weights() if not mode else self._drop_quantized()
        return self

    def _weight_key(self):
        return (self.weight.data_ptr(), self.weight._version, self.weight.device, self.weight.dtype)

    def _quantize_weights(self) -> None:
        """Build ``qweight`` (int8 in {-1, 0, 1}) and ``weight_scale`` from the float weight."""
        wq, g = P.quantize_weight(self.weight, self.quant_config.weight_spec)
        self.register_buffer("qweight", wq, persistent=False)
        self.register_buffer("weight_scale", g, persistent=False)
        self._qweight_key = self._weight_key()

    def _drop_quantized(self) -> None:
        for name in ("qweight", "weight_scale"):
            if name in self._buffers:
                delattr(self, name)
        self._qweight_key = None

    def deploy(self) -> "BitLinear":
        """Quantize permanently: drop the float weight, keep 2-bit packed weights and scales (inference only)."""
        if self.deployed is not None:
            return self
        self.deployed = QuantizedLinear(self.weight, self.bias, self.quant_config.weight_spec, self.act,
                                        name="BitLinear", rule="BitLinear.deploy()")
        self._drop_quantized()
        self.weight = self.bias = None  # the float parameters are gone for good
        self.weight_fq = self.input_fq = None
        return super().train(False)

    def _fully_quantized(self) -> bool:
        """Every quantizer is enabled with ``mix = 1``: the integer path computes the same thing."""
        return all(q.enabled and q.mix >= 1.0 for q in (self.weight_fq, self.input_fq) if q is not None)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed is not None:
            return self.deployed(x)
        if self.training or not self._fully_quantized():
            # eval with fake quant disabled (bfx.disable_fake_quant) or mid warm-up (bfx.QuantWarmup): as in training
            w_fq = self.weight_fq(self.weight)
            if self.input_fq is None:
                return nn.functional.linear(x, w_fq, self.bias)
            return exact_layers.linear(self.input_fq(x), w_fq, self.bias, codes_from=x, weight=self.weight,
                                       input_quantizer=self.input_fq, weight_quantizer=self.weight_fq)
        if self._qweight_key != self._weight_key():  # weights changed since eval(): re-quantize
            self._quantize_weights()
        return torch.ops.bitlab.int8_linear(x, self.qweight, self.weight_scale, self.bias, self.act, None)

    # -- memory ---------------------------------------------------------------------------------
    @property
    def weight_memory_bytes(self) -> int:
        """Real bytes of the deployed weight: 2-bit codes (K padded to 128, four per byte) plus fp32 scales.

        Compare with ``4 * in_features * out_features`` for an fp32 ``nn.Linear`` weight."""
        if self.deployed is not None:
            d = self.deployed
            return sum(t.numel() * t.element_size() for t in (d.packed_weight, d.weight_scale))
        n_scales = math.prod(P.scale_shape((self.out_features, self.in_features), self.quant_config.weight_granularity))
        return self.out_features * padded_k(self.in_features) // 4 + 4 * n_scales

    def packed_bytes(self) -> int:
        """Everything a deployed layer stores: packed weight, scales and bias."""
        if self.deployed is not None:
            return self.deployed.packed_bytes()
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight_memory_bytes + bias

    def extra_repr(self) -> str:
        state = "deployed" if self.deployed is not None else ("train" if self.training else "eval")
        c = self.quant_config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None or (self.deployed is not None and self.deployed.bias is not None)}, "
                f"weight=ternary({c.weight_granularity}), activation={c.activation_dtype}({self.act}), state={state}")
