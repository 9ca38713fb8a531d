"""Where a layer's int8 input codes come from (one decision for prepare and convert)."""
import pytest
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.passes.layer_input import codes_fit_int8, layer_input_codes

STATIC = dict(dynamic=False, granularity="per_tensor")


def _decision(qc, model=None):
    model = model or nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.MaxPool1d(1), nn.Linear(8, 4))
    pm = bfx.prepare_qat(model, qc)
    out = {}
    for n in pm.graph.nodes:
        if "bitlab" in n.meta:
            codes = layer_input_codes(pm, n.args[0], n.meta["bitlab"].token_dims)
            out[n.meta["bitlab"].fqn] = None if codes is None else (codes.quantizer_node.target, codes.on_grid)
    return out


def test_own_int8_input_quantizer_is_fused_on_the_raw_input():
    assert _decision(bfx.ternary()) == {"0": ("0_input_fq", False), "3": ("3_input_fq", False)}


def test_static_quantized_relu_reaches_the_next_layer_on_grid():
    relu4 = bfx.IntActivation(4, signed=False, **STATIC)
    qc = (bfx.QConfigMapping().set_global(bfx.weight_only("ternary"))
          .set_object_type(nn.ReLU, bfx.QuantConfig(output=relu4)))
    assert _decision(qc) == {"0": None, "3": ("1_output_fq", True)}  # through max-pool


def test_dynamic_quantized_relu_is_quantized_again_per_layer_token():
    """A dynamic uint4 ReLU reaches the next layer through max-pool: the op quantizes that input again (its
    multipliers belong to the ReLU's call), per the layer's tokens, on the uint4 range (signed 5-bit codes)."""
    relu4 = bfx.IntActivation(4, signed=False)
    qc = (bfx.QConfigMapping().set_global(bfx.weight_only("ternary"))
          .set_object_type(nn.ReLU, bfx.QuantConfig(output=relu4)))
    assert _decision(qc) == {"0": None, "3": ("1_output_fq", False)}
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.MaxPool1d(1), nn.Linear(8, 4)), qc)
    codes = layer_input_codes(pm, next(n for n in pm.graph.nodes if n.meta.get("bitlab") and
                                       n.meta["bitlab"].fqn == "3").args[0], 1)
    assert codes.requantized and codes.act_bits == 5


@pytest.mark.parametrize("spec, fused", [(bfx.IntActivation(4, **STATIC), True),  # static 4-bit: on grid
                                         (bfx.IntActivation(4), True),  # dynamic 4-bit: fused (act_bits=4)
                                         (bfx.IntActivation(8, signed=False, **STATIC), False)])  # 0..255
def test_lower_bit_own_quantizers(spec, fused):
    got = _decision(bfx.QuantConfig(weight="ternary", input=spec))
    assert (got["0"] is not None) == fused
    assert codes_fit_int8(spec) == (spec.bits < 8 or spec.signed)
