"""The benchmark scripts' command lines: ``bench_linear.py --device cuda`` hands over to the GPU benchmark,
which says clearly what it needs where there is no GPU."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_linear.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no GPU")
def test_device_cuda_without_gpu_exits_2_and_says_why():
    proc = _run("--device", "cuda", "--m", "1")
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "bench_linear.py" in proc.stderr


def test_device_cuda_rejects_a_weight_format_without_cuda_kernel():
    proc = _run("--device", "cuda", "--weights", "int4")
    assert proc.returncode != 0 and "--weights int4 has no CUDA kernel" in proc.stderr


def test_device_option_is_listed_in_help():
    proc = _run("--help")
    assert proc.returncode == 0 and "--device" in proc.stdout


def test_llm_benchmark_runs_and_says_which_peers_are_missing():
    """bench_llm.py end to end on a tiny synthetic Llama: fp32 and bitlab rows; llama.cpp rows or a note."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_llm.py"), "--model", "synthetic",
                           "--hidden", "128", "--vocab", "256", "--layers", "1", "--runtimes",
                           "fp32,bitlab-ternary,bitlab-ternary-greedy,bitlab-ternary-lean,llamacpp-tq2_0", "--repeats", "1",
                           "--new-tokens", "3",
                           "--prefill", "8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| fp32 |" in proc.stdout and "| bitlab-ternary |" in proc.stdout and "| bitlab-ternary-greedy |" in proc.stdout
    assert "| bitlab-ternary-lean |" in proc.stdout
    assert "| llamacpp-tq2_0 |" in proc.stdout or "llamacpp-tq2_0: skipped" in proc.stdout


def test_qat_step_benchmark_runs_its_compiled_rows():
    """bench_qat_step.py on the MLP, one step of fp32 and of the compiled integer forward (bfx.compile): a table row
    each, with a ratio to fp32."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_qat_step.py"), "--cases", "mlp",
                           "--rounds", "1", "--steps", "1", "--variants", "fp32,bitlab ternary int8-fwd compiled"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| MLP")]
    assert [r.split("|")[2].strip() for r in rows] == ["fp32", "bitlab ternary int8-fwd compiled"]
    assert "1.00x" in rows[0]
