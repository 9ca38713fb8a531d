"""The README's main job, examples/quickstart.py, end to end with fewer epochs: it quantizes, trains, converts,
prints the converted graph, the summary and the gains, and the converted model keeps the QAT accuracy."""
import importlib.util
import pathlib

import pytest

pytest.importorskip("sklearn")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_short_run(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("quickstart_example", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    acc = quickstart.main(["--epochs", "3", "--qat-epochs", "2", "--width", "128", "--json", str(tmp_path / "q.json")])
    out = capsys.readouterr().out
    assert acc["fp32"] > 80 and acc["ternary QAT (fake quant)"] > 80
    assert acc["converted"] == pytest.approx(acc["ternary QAT (fake quant)"], abs=0.5)  # one borderline sample
    assert "torch.ops.bitlab.ternary_linear.default" in out and "torch.ops.bitlab.int8_linear.default" in out
    assert "bitlab_fx summary (converted)" in out and "4/4 quantized" in out
    assert "x smaller" in out and "batch-1 latency" in out and (tmp_path / "q.json").exists()
