"""ggml_blocks: converted layers as ggml blocks that gguf-py's own dequantizer reads back as codes x fp16 steps."""
import numpy as np
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.export import ggml_blocks
from bitlab_fx.export.weights import layer_weight

gguf = pytest.importorskip("gguf")


def _layer(weight_spec, in_features: int, out_features: int = 8):
    torch.manual_seed(0)
    return layer_weight(bfx.QuantizedLinear(torch.randn(out_features, in_features), None, weight_spec))


def _read_back(kind: str, data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]))


@pytest.mark.parametrize("weight_spec,wanted", [
    (bfx.TernaryWeight(), "TQ2_0"), (bfx.TernaryWeight(), "TQ1_0"),
    (bfx.TernaryWeight(granularity=bfx.PerGroup(256)), "TQ2_0"),
    (bfx.IntWeight(8), "Q8_0"), (bfx.IntWeight(4), "Q4_0"), (bfx.IntWeight(4, granularity=bfx.PerGroup(32)), "Q4_0"),
    (bfx.IntWeight(3, granularity="per_tensor"), "Q4_0"),
])
def test_blocks_hold_the_codes_and_the_steps_in_fp16(weight_spec, wanted):
    layer = _layer(weight_spec, in_features=512)
    kind, data = ggml_blocks.encode(layer, wanted)
    assert kind == wanted
    steps_fp16 = layer.steps.half().float().repeat_interleave(layer.group, dim=1)
    assert torch.equal(_read_back(kind, data), layer.codes.float() * steps_fp16)


def test_bytes_per_weight_are_the_types_own():
    layer = _layer(bfx.TernaryWeight(), in_features=1024)
    assert ggml_blocks.encode(layer, "TQ2_0")[1].shape == (8, 4 * 66)  # 64 code bytes + fp16 per 256
    assert ggml_blocks.encode(layer, "TQ1_0")[1].shape == (8, 4 * 54)  # 48 + 4 base-3 bytes + fp16


@pytest.mark.parametrize("in_features,wanted,written", [(576, "TQ2_0", "Q8_0"), (576, "TQ1_0", "Q8_0"),
                                                        (100, "TQ2_0", "F16"), (48, "Q4_0", "F16")])
def test_rows_that_are_not_whole_blocks_go_to_the_next_exact_type(in_features, wanted, written):
    spec = bfx.IntWeight(4) if wanted == "Q4_0" else bfx.TernaryWeight()
    layer = _layer(spec, in_features=in_features)
    kind, data = ggml_blocks.encode(layer, wanted)
    assert kind == written
    back = torch.from_numpy(data.astype(np.float32)) if kind == "F16" else _read_back(kind, data)
    assert torch.allclose(back, layer.dequantized(), rtol=1e-3, atol=0)
