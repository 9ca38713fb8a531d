"""The Triton (CUDA) kernels of bitlab.ternary_linear / int8_linear against reference.py.

The cases live in ``_triton_interp_cases.py`` and run in a subprocess: under ``TRITON_INTERPRET=1`` on
CPU (always, when triton is installed), and natively when a GPU is present. A subprocess because the
interpreter switch is read when triton is imported and must not leak into other test modules.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("_triton_interp_cases.py")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'bitlab-fx[cuda]')")


def _run_cases(interpret: bool) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["BITLAB_TRITON_CASES"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU tensors only; never initialise a GPU from the interpreter run
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           str(CASES)]
    proc = subprocess.run(cmd, cwd=CASES.parent, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{tail}"
    print(tail)


@needs_triton
def test_kernels_match_reference_under_triton_interpreter():
    _run_cases(interpret=True)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_match_reference_on_gpu():
    _run_cases(interpret=False)


def test_import_bitlab_fx_loads_no_triton_and_no_cuda():
    code = ("import sys, torch, bitlab_fx; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'bitlab_fx.ops.cuda.kernels' not in sys.modules; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
