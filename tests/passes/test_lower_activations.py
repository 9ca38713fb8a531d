"""Convert's lowering of the activation quantizers that are not fused into a layer op."""
import torch
from torch import nn

import bitlab_fx as bfx


def _relu4_model():
    relu4 = bfx.IntActivation(4, signed=False, dynamic=False, granularity="per_tensor")
    qc = (bfx.QConfigMapping().set_global(bfx.weight_only("int8"))
          .set_object_type(nn.ReLU, bfx.QuantConfig(output=relu4)))
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), qc)
    pm.train()(torch.randn(32, 8) * 2)
    return pm.eval()


def test_static_quantizer_becomes_quantize_dequantize_with_its_multiplier_buffer():
    pm = _relu4_model()
    fq = pm.get_submodule("1_output_fq")
    cm = bfx.convert(pm)
    calls = [n for n in cm.graph.nodes if n.target is torch.ops.bitlab.quantize_dequantize.default]
    assert len(calls) == 1 and calls[0].args[1].target == "1_output_multiplier"
    assert torch.equal(cm.get_buffer("1_output_multiplier"), fq.multiplier(torch.empty(0)).reshape(1))
    x = torch.randn(5, 8)
    assert torch.equal(cm(x), pm(x))


def test_disabled_quantizer_is_dropped():
    pm = _relu4_model()
    pm.get_submodule("1_output_fq").enabled = False
    cm = bfx.convert(pm)
    assert not any(n.target is torch.ops.bitlab.quantize_dequantize.default for n in cm.graph.nodes)
