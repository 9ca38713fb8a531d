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
