"""QAT training step time: fp32 against the prepared (fake-quant) model, same model and batch, same run.

    python benchmarks/bench_qat_step.py [--rounds 7] [--steps 10]

Models: an MLP of three 1024-wide layers (batch 256) and a small convnet (batch 64, 3x32x32). Each round
times ``steps`` optimizer steps of every variant, variants interleaved; the table gives the median step time
over rounds, its spread (min..max) and the ratio to fp32. Threads: torch's default (the cores it sees).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx


def _mlp():
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def _convnet():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


CASES = {"mlp 3x1024, batch 256": (_mlp, (256, 1024)), "convnet, batch 64": (_convnet, (64, 3, 32, 32))}


def _variants(make, shape):
    torch.manual_seed(0)
    fp32 = make()
    ternary = bfx.prepare_qat(copy.deepcopy(fp32), bfx.ternary())
    int8 = bfx.prepare_qat(copy.deepcopy(fp32), bfx.int8())
    return {"fp32": fp32, "ternary W1.58A8": ternary, "int8 W8A8": int8}


def _time_steps(model, x, y, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {torch.backends.cpu.get_cpu_capability()}")
    print("| model | variant | step ms (median) | spread ms | vs fp32 |")
    print("|---|---|---|---|---|")
    for case, (make, shape) in CASES.items():
        models = _variants(make, shape)
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
        for m in models.values():
            _time_steps(m, x, y, 2)  # warm-up
        times = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, m in models.items():
                times[name].append(_time_steps(m, x, y, args.steps) * 1e3)
        base = statistics.median(times["fp32"])
        for name, t in times.items():
            med = statistics.median(t)
            print(f"| {case} | {name} | {med:.1f} | {min(t):.1f}..{max(t):.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
