"""bfx.export_onnx: converted models run in onnxruntime (MatMulNBits / QDQ) and agree with bitlab_fx."""
import numpy as np
import pytest
import torch

import bitlab_fx as bfx

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
ort.set_default_logger_severity(3)


def _run_onnx(path, *inputs) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {spec.name: t.numpy() for spec, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)[0]


def _run_torch(model, *inputs) -> np.ndarray:
    with torch.no_grad():
        out = model(*inputs)
    return (out if isinstance(out, torch.Tensor) else out[0]).numpy()


def _matmul_nbits_weights(path) -> int:
    import onnx

    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes]
    return sum(a["K"] * a["N"] for a in attrs)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _mlp(width: int = 64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(), torch.nn.Linear(2 * width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 10))


@pytest.mark.parametrize("qconfig,node", [
    (bfx.ternary(), "MatMulNBits(bits=2, block_size=128)"),
    (bfx.QuantConfig(weight=bfx.IntWeight(4, granularity=bfx.PerGroup(32)), input="int8"),
     "MatMulNBits(bits=4, block_size=32)"),
    (bfx.int8(), "MatMulNBits(bits=8, block_size=128)"),
    (bfx.weight_only("int4"), "MatMulNBits(bits=4, block_size=128)"),
    (bfx.QuantConfig(weight=bfx.TernaryWeight(granularity=bfx.PerGroup(64)), input="int8"),
     "MatMulNBits(bits=2, block_size=64)"),
])
def test_linears_become_matmul_nbits_and_agree_with_a_dynamic_batch(tmp_path, qconfig, node):
    converted = bfx.convert(bfx.prepare_qat(_mlp(), qconfig).eval())
    path = tmp_path / "mlp.onnx"
    lowered = bfx.export_onnx(converted, path, (torch.randn(2, 64),))
    assert lowered["2"] == node  # 128 inputs: per-group steps are blocks of MatMulNBits (64-wide rows: one block)
    assert set(lowered) == {"0", "2", "4"} and all(v.startswith(node[:17]) for v in lowered.values())
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))  # another batch size than the example's
    assert _relative_error(_run_onnx(path, x), _run_torch(converted, x)) <= 1e-2


def test_ternary_file_is_at_least_12x_smaller_than_fp32(tmp_path):
    model = _mlp(width=512)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    converted = bfx.convert(bfx.prepare_qat(model, bfx.ternary()).eval())
    path = tmp_path / "mlp.onnx"
    bfx.export_onnx(converted, path, (torch.randn(1, 512),))
    assert fp32_bytes / path.stat().st_size >= 12


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.conv1d = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean(2)
        return self.fc(torch.relu(self.conv1d(x)).flatten(1))


def test_convs_become_dequantize_linear_and_conv(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(torch.nn.Conv1d, bfx.int8())
    converted = bfx.convert(bfx.prepare_qat(ConvNet(), qc, example_inputs=(x,)).eval())
    path = tmp_path / "convnet.onnx"
    lowered = bfx.export_onnx(converted, path, (x,))
    assert lowered == {"conv": "DequantizeLinear(int8) + Conv", "conv1d": "DequantizeLinear(int8) + Conv",
                       "fc": "MatMulNBits(bits=2, block_size=128)"}
    x5 = torch.randn(5, 3, 16, 16)
    assert _relative_error(_run_onnx(path, x5), _run_torch(converted, x5)) <= 1e-2


@pytest.mark.parametrize("name", ["bert", "vit", "llama"])
def test_hugging_face_models_export_without_cache(tmp_path, name):
    import _hf_tiny

    model, inputs, _, _ = _hf_tiny.build(name)
    converted = bfx.convert(bfx.prepare_qat(model, bfx.ternary(), example_inputs=inputs).eval())
    path = tmp_path / f"{name}.onnx"
    lowered = bfx.export_onnx(converted, path, inputs)
    assert set(lowered.values()) <= {"MatMulNBits(bits=2, block_size=128)", "DequantizeLinear(int8) + Conv"}
    linear_weights = sum(m.in_features * m.out_features for m in converted.modules()
                         if isinstance(m, bfx.QuantizedLinear))
    assert _matmul_nbits_weights(path) == linear_weights  # every converted linear runs as MatMulNBits (fused or not)
    other = (torch.randn(3, 3, 16, 16),) if name == "vit" else (torch.randint(0, _hf_tiny.VOCAB, (3, 12)),)
    assert _relative_error(_run_onnx(path, *other), _run_torch(converted, *other)) <= 1e-2


def test_bad_input_raises_an_export_error_that_says_what_to_do(tmp_path):
    model = _mlp()
    x = torch.randn(2, 64)
    with pytest.raises(bfx.ExportError, match="no quantized layer.*bfx.convert"):
        bfx.export_onnx(model, tmp_path / "a.onnx", (x,))
    with pytest.raises(bfx.ExportError, match="prepared"):
        bfx.export_onnx(bfx.prepare_qat(model, bfx.ternary()), tmp_path / "b.onnx", (x,))

    class FixedBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 8)

        def forward(self, x):
            return self.fc(x).reshape(2, 8)  # only holds for the example's batch of 2

    converted = bfx.convert(bfx.prepare_qat(FixedBatch(), bfx.ternary()).eval())
    with pytest.raises(bfx.ExportError, match="dynamic batch.*dynamic_batch=False"):
        bfx.export_onnx(converted, tmp_path / "c.onnx", (x,))
    bfx.export_onnx(converted, tmp_path / "c.onnx", (x,), dynamic_batch=False)
    assert _relative_error(_run_onnx(tmp_path / "c.onnx", x), _run_torch(converted, x)) <= 1e-2
