"""Where a quantized layer's int8 input codes come from: one decision for prepare and convert.

``prepare_qat`` computes such a layer from its codes (``quant.exact_layers``) and ``convert`` fuses the
same quantization into the layer's op, so both must agree on it:

- the layer's own (or directly feeding) int8 signed quantizer: the op quantizes the raw input itself
  (dynamic per token/tensor, or with the static multiplier); likewise a *dynamic* signed quantizer of fewer
  bits (the op's ``act_bits``: ``IntActivation(bits=4)``'s codes in ``[-8, 7]``, one multiplier ``7 / max|x|``
  per token), whose per-token multipliers only the op can recompute from the raw input;
- a *dynamic* quantizer whose codes fit int8 that reaches the layer through grid-preserving ops (a quantized ReLU
  through max-pool and flatten): its multipliers belong to its own call, so the op quantizes the layer input
  again, per the layer's own tokens (a conv's token is a sample, a linear's a row), on that quantizer's range
  (``requantized``; unsigned ``b`` bits are signed ``b + 1`` bits on these non-negative values). Where the
  quantizer's tokens are the layer's (and max-pool keeps each token's max) the codes come back unchanged;
- a static quantizer whose codes fit int8 (signed up to 8 bits, unsigned up to 7) that reaches the layer
  through grid-preserving ops (its own lower-bit input quantizer, or a quantized ReLU through max-pool and
  flatten): the layer input holds grid values ``q / mult``, and ``round(v * mult)`` gives back ``q``
  exactly, so the op takes those values with that static multiplier (``on_grid``);
- anything else (float input, a dynamic quantizer reached through other ops, unsigned dynamic, 8-bit unsigned):
  no codes; the op runs on float activations (``act="none"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import fx

from ..config import IntActivation
from ..quant.fake_quant import ActivationFakeQuant
from .input_scale import upstream_quantizer_node


@dataclass(frozen=True)
class InputCodes:
    quantizer: ActivationFakeQuant
    quantizer_node: fx.Node  # the call_module node of ``quantizer``
    source: fx.Node  # the values the codes are computed from
    on_grid: bool  # ``source`` holds the quantizer's grid values (codes recovered by ``round(v * mult)``)
    requantized: bool = False  # ``source`` holds a dynamic quantizer's grid values, quantized again per layer token

    @property
    def act_bits(self) -> int:
        """The bits of the signed codes the op computes: the fused quantizer's (unsigned ``b`` bits: ``b + 1``, the
        same codes on non-negative values), or 8 (on-grid values read back as int8)."""
        spec = self.quantizer.spec
        return 8 if self.on_grid else spec.bits + (0 if spec.signed else 1)


def codes_fit_int8(spec: IntActivation) -> bool:
    return spec.bits <= 8 if spec.signed else spec.bits <= 7


def layer_input_codes(gm: fx.GraphModule, x, token_dims: int) -> Optional[InputCodes]:
    """The int8 code source of a layer whose input argument is ``x`` (a layer of ``token_dims`` trailing
    dims per token), or None when its converted op must take float activations."""
    if isinstance(x, fx.Node) and x.op == "call_module":
        fq = gm.get_submodule(x.target)
        if isinstance(fq, ActivationFakeQuant) and fq.spec.signed and (fq.spec.bits == 8 or fq.spec.dynamic):
            per_token = fq.spec.dynamic and fq.spec.granularity == "per_token"
            if not per_token or fq.token_dims == token_dims:  # (else: not the op's tokens, re-quantized below)
                return InputCodes(fq, x, x.args[0], on_grid=False)
    node = upstream_quantizer_node(gm, x)
    if node is None:
        return None
    fq = gm.get_submodule(node.target)
    if not codes_fit_int8(fq.spec):
        return None
    if fq.spec.dynamic:
        return InputCodes(fq, node, x, on_grid=False, requantized=True)
    return InputCodes(fq, node, x, on_grid=True)
