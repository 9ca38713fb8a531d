"""One linear layer at M = 1 (a decode step) with per-group weight scales against one scale per row.

    flock /tmp/bitlab_bench.lock python benchmarks/bench_group_decode.py            # the issue-16 shapes
    python benchmarks/bench_group_decode.py --shapes 576x1536 --rounds 5            # quicker

Each variant is the op as a converted model calls it (``torch.ops.bitlab.<format>_linear``, per-token int8
activations, no bias) on one random ``[1, K]`` input; ``NxK`` is out_features x in_features. Variants: int4 with
groups of 32 / 64 / 128 and per channel, ternary per channel and with groups of 64 / 128, int8 per channel and with
groups of 32. Rounds are interleaved (every variant once per round, then again), so a burst of load on a shared
host slows all alike; printed: the median over rounds of the per-call microseconds, and the spread (min..max);
"-" where the group size does not divide K.
Threads as shipped (``torch.get_num_threads()``); weights of one layer stay in the cache (one layer, repeated).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tabulate import tabulate

import bitlab_fx  # noqa: F401  (defines torch.ops.bitlab)
from bitlab_fx.ops import cpu

# name: (the op, its group size in k, or None for one scale per row)
VARIANTS = {
    "int4 g32": ("int4_linear", 32), "int4 g64": ("int4_linear", 64), "int4 g128": ("int4_linear", 128),
    "int4 per-channel": ("int4_linear", None),
    "ternary per-channel": ("ternary_linear", None), "ternary g64": ("ternary_linear", 64),
    "ternary g128": ("ternary_linear", 128), "int8 per-channel": ("int8_linear", None), "int8 g32": ("int8_linear", 32),
}


def _stored(op: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if op == "ternary_linear":
        return torch.randint(0, 255, (n, (k + 127) // 128 * 32), dtype=torch.uint8, generator=gen)
    if op == "int4_linear":
        return torch.randint(0, 255, (n, (k + 1) // 2), dtype=torch.uint8, generator=gen)
    return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)


def make_call(name: str, n: int, k: int):
    """A no-argument function running one M = 1 call of the variant."""
    op_name, group = VARIANTS[name]
    gen = torch.Generator().manual_seed(n * 31 + k)
    w = _stored(op_name, n, k, gen)
    ws = (torch.rand(n, k // group, generator=gen) if group else torch.rand(n, generator=gen)) / 100 + 1e-3
    x = torch.randn(1, k, generator=gen)
    op = getattr(torch.ops.bitlab, op_name).default
    if op_name == "int8_linear":
        return lambda: op(x, w, ws, None, "per_token", None)
    return lambda: op(x, w, ws, None, "per_token", None, k)


def per_call_us(fns: dict, rounds: int, budget_s: float) -> dict:
    """{name: [per-call microseconds of each round]}, the variants interleaved within every round."""
    iters = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        iters[name] = max(3, int(budget_s / max(time.perf_counter() - t0, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / iters[name] * 1e6)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="576x1536,1536x576,4096x4096", help="NxK, comma-separated")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--budget", type=float, default=0.05, help="seconds of calls per variant per round")
    p.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads; 0: as shipped")
    p.add_argument("--json", default="", help="also write every round's per-call us here ({shape: {variant: [...]}})")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    print(f"M = 1, per-token int8 activations, {torch.get_num_threads()} threads, kernel ISA {cpu.set_isa(None)}, "
          f"median of {args.rounds} interleaved rounds (min..max), us per call")
    rows, raw = [], {}
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        fits = [name for name in names if k % (VARIANTS[name][1] or k) == 0]  # groups must divide K
        times = raw[shape] = per_call_us({name: make_call(name, n, k) for name in fits}, args.rounds, args.budget)
        rows.append([shape] + [f"{statistics.median(times[name]):.1f} ({min(times[name]):.1f}..{max(times[name]):.1f})"
                               if name in times else "-" for name in names])
    print(tabulate(rows, headers=["N x K"] + names, tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f)


if __name__ == "__main__":
    main()
