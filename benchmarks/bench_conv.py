"""Converted conv layers on CPU (bitlab ternary, im2col + the integer GEMM kernel) against fp32 PyTorch conv.

    flock -x /tmp/bitlab_cpu.lock python benchmarks/bench_conv.py

Each row builds ``nn.Sequential(nn.Conv1d|nn.Conv2d)``, converts it with ``bfx.ternary()`` (int8 activations,
one scale per sample) and times the converted module and the float module on the same input, interleaved,
in this one run (median of rounds, microseconds). ``x fp32`` > 1 means the converted layer is faster.
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time

import torch
from tabulate import tabulate
from torch import nn

import bitlab_fx as bfx

CASES = [  # (kind, C_in, C_out, spatial, kernel, batch)
    ("conv1d", 256, 256, (1000,), 3, 1),
    ("conv1d", 512, 512, (200,), 5, 1),
    ("conv1d", 512, 512, (200,), 5, 8),
    ("conv1d", 1024, 1024, (64,), 3, 1),
    ("conv2d", 64, 64, (56, 56), 3, 1),
    ("conv2d", 256, 256, (14, 14), 3, 1),
    ("conv2d", 512, 512, (7, 7), 3, 4),
]


def timed(fn, budget: float = 0.3) -> float:
    fn()
    ts, t_end = [], time.perf_counter() + budget
    while time.perf_counter() < t_end or len(ts) < 5:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for kind, cin, cout, spatial, k, batch in CASES:
        cls = nn.Conv1d if kind == "conv1d" else nn.Conv2d
        float_model = nn.Sequential(cls(cin, cout, k, padding=k // 2)).eval()
        converted = bfx.convert(bfx.prepare_qat(float_model, bfx.ternary()).eval())
        x = torch.randn(batch, cin, *spatial)
        with torch.inference_mode():
            t32, tq = [], []
            for _ in range(3):  # interleaved rounds: both columns see the same machine state
                t32.append(timed(lambda: float_model(x)))
                tq.append(timed(lambda: converted(x)))
        f, q = min(t32), min(tq)
        rows.append([kind, f"{cin}->{cout}", "x".join(map(str, spatial)), k, batch, f, q, f / q])
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}; {datetime.date.today()}")
    print(tabulate(rows, headers=["op", "channels", "spatial", "k", "batch", "fp32 us", "bitlab us", "x fp32"],
                   tablefmt="github", floatfmt=".2f"))


if __name__ == "__main__":
    main()
