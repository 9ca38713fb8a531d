"""What both exporters refuse before writing anything: integer biases they cannot write yet."""
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.export.weights import check_converted


def test_integer_biases_are_refused_with_the_layer_name():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8))
    act = bfx.IntActivation(bits=8, dynamic=False, granularity="per_tensor")
    qc = bfx.QuantConfig(weight=bfx.TernaryWeight(), input=act, bias=bfx.IntBias(bits=16))
    pm = bfx.prepare_qat(mlp, qc)
    with bfx.calibrate(pm):
        pm(torch.randn(32, 16))
    cm = bfx.convert(pm.eval())
    with pytest.raises(bfx.ExportError, match="integer biases.*'0'"):
        check_converted(cm, "ONNX")


def test_per_token_integer_biases_and_fewer_activation_bits_are_refused_with_the_layer_name():
    """On a dynamic input the IntBias codes are made per token by the op, and a dynamic 4-bit input quantizer is
    fused as act_bits=4: neither has an exporter yet."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8))
    qc = bfx.QuantConfig(weight=bfx.TernaryWeight(), input=bfx.IntActivation(bits=8), bias=bfx.IntBias(bits=8))
    cm = bfx.convert(bfx.prepare_qat(mlp, qc).eval())
    with pytest.raises(bfx.ExportError, match="integer biases.*'0'.*made per token"):
        check_converted(cm, "GGUF")
    cm = bfx.convert(bfx.prepare_qat(mlp, bfx.QuantConfig(weight=bfx.TernaryWeight(), input=bfx.IntActivation(4))).eval())
    with pytest.raises(bfx.ExportError, match="fewer than 8 bits.*'0'"):
        check_converted(cm, "ONNX")
