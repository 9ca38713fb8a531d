"""examples/lenet.py end to end, shortened: W3A4 QAT -> convert keeps the accuracy, the file shrinks."""
import importlib.util
import pathlib

import pytest

pytest.importorskip("sklearn")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lenet_example_short_run(capsys):
    spec = importlib.util.spec_from_file_location("lenet_example", ROOT / "examples" / "lenet.py")
    lenet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lenet)
    r = lenet.main(["--epochs", "4", "--qat-epochs", "2", "--threads", "1"])
    assert r["fp32"] > 80 and r["qat"] > 80
    assert r["converted"] == pytest.approx(r["qat"], abs=0.3)  # at most one borderline test image of 450
    assert r["rel"] <= 1e-3 and r["bitwise"]  # integer ops, int32 bias codes: converted == QAT bit for bit
    assert r["sizes"]["converted"] * 5 < r["sizes"]["fp32"] <= r["sizes"]["QAT (prepared)"]
    assert "int4_conv2d" in capsys.readouterr().out
    assert r["ptq"] > r["fp32"] - 2  # W8A8 calibrated in eval mode, no training: close to fp32
