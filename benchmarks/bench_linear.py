"""Ternary linear on CPU: the bitlab C kernel (through the public API) against torch baselines.

Run (serialised against tests on a shared machine)::

    flock -x /tmp/bitlab_cpu.lock python benchmarks/bench_linear.py [--quick]
    python benchmarks/bench_linear.py --device cuda [--weights int8] [--sweep] [--autotune] [--m 1 16]

``--device cuda`` runs the GPU benchmark of the Triton kernels instead (``bench_linear_cuda.py``, whose
options it passes on): cuBLAS bf16 and torch int8 weight-only against the bitlab kernel, with HBM GB/s.

Shapes are ``N x K`` = out_features x in_features; ``M`` is the batch (tokens). Every time is the best
median of a few repeats, in microseconds, measured in this one run with torch's default threading
(``torch.get_num_threads()``; the kernel uses the same count and shares torch's OpenMP pool).

Columns: fp32 / bf16 ``F.linear``; torch int8 weight-only (``torch._weight_int8pack_mm``); torch dynamic
int8 (``torch.ao.nn.quantized.dynamic.Linear``, baseline only); bitlab reference (``reference.py``, few
iterations, small shapes only); bitlab kernel = ``bfx.convert(bfx.prepare_qat(nn.Sequential(nn.Linear(K, N)),
bfx.ternary()).eval())`` called like a model; speedups of the kernel over fp32 / bf16 / int8-wo; the
kernel's packed-weight GB/s. "GB/s DRAM" is the M=1 op (``torch.ops.bitlab.ternary_linear``) rotating over
enough distinct layers that their packed weights are ~2.5x the last-level cache, like a decoder streaming
its layers; it is compared with the read bandwidth of a large-array sum measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import datetime
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.ops import cpu, reference

SHAPES = [(1024, 1024), (4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]
BATCHES = [1, 4, 16, 32, 128]


def bench(fn, budget_s=0.25, repeats=5, max_iters=2000):
    """Microseconds per call: the best over ``repeats`` of the mean of a timed loop (one call if slow)."""
    return bench_all({"f": fn}, budget_s, repeats, max_iters)["f"]


def bench_all(fns, budget_s=0.25, repeats=5, max_iters=2000):
    """Microseconds per call of each function, timed in interleaved rounds (fp32, bf16, ..., bitlab, then
    again), so a burst of load on the shared VM host slows every column of a row alike instead of one."""
    iters, times = {}, {}
    for key, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        if one > budget_s:  # slow baselines (int8 weight-only at large M): one timed call, not repeated
            times[key] = [one]
        else:
            iters[key] = max(1, min(max_iters, int(budget_s / repeats / max(one, 1e-7))))
            times[key] = []
    for _ in range(repeats):
        for key, n in iters.items():
            fn = fns[key]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[key].append((time.perf_counter() - t0) / n)
    return {key: min(v) * 1e6 for key, v in times.items()}


def memory_bandwidth_gbs(big=None) -> float:
    big = torch.ones(2 ** 28) if big is None else big  # 1 GiB, far beyond the LLC
    big.sum()
    res = []
    for _ in range(5):
        t0 = time.perf_counter()
        big.sum()
        res.append(time.perf_counter() - t0)
    return big.numel() * 4 / statistics.median(res) / 1e9


def llc_bytes() -> int:
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("L3 cache"):
                return int(line.split(":")[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 64 << 20


def dynamic_int8(lin: nn.Linear):
    """torch's dynamic-quantized int8 linear (benchmark baseline only), or None where unavailable."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear
        engines = torch.backends.quantized.supported_engines
        # x86: the x86 engine (fbgemm); ARM64: qnnpack
        torch.backends.quantized.engine = next((e for e in ("x86", "qnnpack") if e in engines), engines[-1])
        lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
        return DynLinear.from_float(lin)
    except Exception:
        return None


WEIGHTS = {  # --weights: the converted layer's weight format and the op a decoder sweep calls
    "ternary": (lambda: bfx.ternary(), lambda n, k: torch.randint(0, 255, (n, (k + 127) // 128 * 32), dtype=torch.uint8),
                lambda x, w, ws, k: torch.ops.bitlab.ternary_linear(x, w, ws, None, "per_token", None, k)),
    "int4": (lambda: bfx.QuantConfig(weight=bfx.IntWeight(4), input="int8"),
             lambda n, k: torch.randint(0, 255, (n, (k + 1) // 2), dtype=torch.uint8),
             lambda x, w, ws, k: torch.ops.bitlab.int4_linear(x, w, ws, None, "per_token", None, k)),
    "int8": (lambda: bfx.int8(), lambda n, k: torch.randint(-127, 128, (n, k), dtype=torch.int8),
             lambda x, w, ws, k: torch.ops.bitlab.int8_linear(x, w, ws, None, "per_token", None)),
}


def dram_gbs(n: int, k: int, llc: int, quick: bool, big, fmt: str = "ternary", weight_only: bool = False) -> tuple:
    """M=1 through the op, rotating over enough layers that the packed weights exceed the LLC; timed in
    rounds alternating with the 1 GiB read-bandwidth probe. Returns (best GB/s, best probe GB/s)."""
    _, make, call = WEIGHTS[fmt]
    one = make(n, k)
    target = (1 << 30) if quick else int(2.5 * llc)
    layers = max(2, min(2048, target // one.numel()))
    weights = [one.clone() for _ in range(layers)]
    ws, x = torch.rand(n), torch.randn(1, k)

    if weight_only:  # the same op with act="none"
        op = {"ternary": torch.ops.bitlab.ternary_linear, "int4": torch.ops.bitlab.int4_linear}.get(fmt)

        def sweep():
            for w in weights:
                if op is None:
                    torch.ops.bitlab.int8_linear(x, w, ws, None, "none", None)
                else:
                    op(x, w, ws, None, "none", None, k)
    else:
        def sweep():
            for w in weights:
                call(x, w, ws, k)

    sweep()
    kernel, probe = [], []
    for _ in range(2 if quick else 3):
        probe.append(memory_bandwidth_gbs(big))
        kernel.append(one.numel() * layers / _timed(sweep) / 1e9)
    return max(kernel), max(probe)


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    pre.add_argument("--weights", default="ternary")
    known, rest = pre.parse_known_args()
    if known.device == "cuda":
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_linear_cuda

        if known.weights not in ("ternary", "int8"):
            raise SystemExit(f"bench_linear.py --device cuda: --weights {known.weights} has no CUDA kernel "
                             "(ternary and int8 do); drop --weights or pick one of those")
        raise SystemExit(bench_linear_cuda.main(["--op", known.weights] + rest))
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the Triton kernels on a GPU (bench_linear_cuda.py; its options pass through)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes/batches, shorter timings")
    ap.add_argument("--weights", choices=sorted(WEIGHTS), default="ternary",
                    help="weight format of the converted layer (ternary: the issue's kernel; int4/int8: the low-bit ops)")
    ap.add_argument("--weight-only", action="store_true",
                    help="bfx.weight_only(<weights>): float activations (act='none') instead of int8 ones")
    ap.add_argument("--json", default=None,
                    help="also write the rows here (default benchmarks/results/bench_linear.json, read by "
                         "docs/make_plots.py; bench_linear_<weights>.json for int4/int8); '' to skip")
    args = ap.parse_args()
    if args.json is None:
        suffix = ("" if args.weights == "ternary" else f"_{args.weights}") + ("_wo" if args.weight_only else "")
        args.json = f"benchmarks/results/bench_linear{suffix}.json"
    shapes = SHAPES[:2] if args.quick else SHAPES
    batches = [1, 32] if args.quick else BATCHES
    budget = 0.08 if args.quick else 0.2
    torch.manual_seed(0)
    assert cpu.kernel_library() is not None, "the CPU kernel did not build"
    big = torch.ones(2 ** 28)
    bw = memory_bandwidth_gbs(big)
    llc = llc_bytes()
    rows = []
    for n, k in shapes:
        lin = nn.Linear(k, n)
        w32, b32 = lin.weight.detach(), lin.bias.detach()
        w16, b16 = w32.bfloat16(), b32.bfloat16()
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s8 = torch.rand(n)
        dyn = dynamic_int8(nn.Linear(k, n))
        qconfig = bfx.weight_only(args.weights) if args.weight_only else WEIGHTS[args.weights][0]()
        model = bfx.convert(bfx.prepare_qat(nn.Sequential(lin), qconfig).eval())
        qlin = model.get_submodule("0")
        packed, wsc, qb = qlin.stored_weight, qlin.weight_scale, qlin.bias
        packed_bytes = packed.numel()
        dram, probe = dram_gbs(n, k, llc, args.quick, big, args.weights, args.weight_only)
        for m in batches:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            with torch.inference_mode():
                fns = {"fp32": lambda: F.linear(x, w32, b32), "bf16": lambda: F.linear(xb, w16, b16),
                       "int8wo": lambda: torch._weight_int8pack_mm(x, w8, s8), "bitlab": lambda: model(x)}
                if dyn is not None:
                    fns["dyn"] = lambda: dyn(x)
                t = bench_all(fns, budget)
                t32, t16, t8, tk, tdyn = t["fp32"], t["bf16"], t["int8wo"], t["bitlab"], t.get("dyn", float("nan"))
                small = n * k <= 4096 * 4096 and m <= 32 and not args.quick and args.weights == "ternary"
                tref = bench(lambda: reference.ternary_linear(x, packed, wsc, qb), 0.05, repeats=1) \
                    if small else float("nan")
            rows.append([f"{n}x{k}", m, t32, t16, t8, tdyn, tref, tk, t32 / tk, t16 / tk, t8 / tk,
                         packed_bytes / tk / 1e3, (dram, probe) if m == 1 else float("nan")])
            print(" ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in rows[-1]), flush=True)
        # free this shape's layers before the next (a del would leave the lambdas above naming deleted names)
        model = qlin = lin = dyn = None
    headers = ["N x K", "M", "fp32 us", "bf16 us", "int8-wo us", "dyn-int8 us", "ref us", "bitlab us",
               "x fp32", "x bf16", "x int8-wo", "GB/s", "GB/s DRAM"]
    cpu_name = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                cpu_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    print()
    print(f"weights: {args.weights}{' weight-only' if args.weight_only else ''}; machine: {cpu_name}, {torch.get_num_threads()} threads, kernel ISA {cpu.set_isa(None)}; "
          f"torch {torch.__version__}; {datetime.date.today()}")
    print(f"memory bandwidth (1 GiB sum, same run): {bw:.1f} GB/s at the start; LLC {llc >> 20} MiB; the DRAM "
          f"column is % of the same probe re-measured in rounds alternating with that row's sweep")
    for r in rows:
        if isinstance(r[-1], tuple):
            d, p = r[-1]
            r[-1] = f"{d:.1f} ({100 * d / p:.0f}% of {p:.1f})"
        else:
            r[-1] = ""
    print(tabulate(rows, headers=headers, tablefmt="github", floatfmt=".1f", missingval=""))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        meta = {"weights": args.weights, "weight_only": args.weight_only, "machine": cpu_name, "threads": torch.get_num_threads(), "isa": cpu.set_isa(None),
                "torch": torch.__version__, "date": str(datetime.date.today()), "bandwidth_gbs": bw}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [dict(zip(headers, r)) for r in rows]}, f, indent=1,
                      default=lambda v: None)
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
