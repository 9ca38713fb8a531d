"""bitlab Triton linear kernels vs cuBLAS bf16 and torch int8 weight-only, on one CUDA GPU.

    python benchmarks/bench_linear_cuda.py                 # ternary, all shapes, M = 1 4 16 64 256
    python benchmarks/bench_linear_cuda.py --op int8 --m 1 16
    python benchmarks/bench_linear_cuda.py --sweep         # also time the autotune candidates, report the best
    python benchmarks/bench_linear_cuda.py --sweep-full    # ... or a wide grid of tile configs (slow: compiles)
    python benchmarks/bench_linear_cuda.py --autotune      # also time the op with autotuning on

Shapes are ``K x N`` (in_features x out_features): 4096x4096, 8192x8192, 8192x28672, 28672x8192.
Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``; ``--no-graph`` for plain
launches). GB/s counts the bytes a kernel must move at least once: weights (+ scales) + x + y.
Targets on H100 (docs/cuda.md): M=1 8192x8192 >= 4x bf16 and >= 60% of HBM peak; M=16 >= 2.5x bf16;
never slower than bf16 up to M=256.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import sys

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
MS = [1, 4, 16, 64, 256]
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def _peak_gbs(name: str, override: float | None) -> float:
    if override:
        return override
    return next((v for k, v in PEAK_GBS.items() if k in name), 3350.0)


def _bench(fn, graph: bool) -> float:
    """Median time in microseconds."""
    import triton.testing

    if graph:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50)
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100)


def _sweep_configs(m: int, n: int, k: int, full: bool):
    from bitlab_fx.ops.cuda.kernels import LinearConfig, autotune_candidates

    if not full:
        yield from autotune_candidates(m, n, k, 0, torch.cuda.get_device_properties(0).multi_processor_count)
        return

    if m <= 8:
        for bn, nb, sk, w in itertools.product((16, 32, 64, 128), (1, 2, 4), (1, 2, 4, 8), (2, 4, 8)):
            yield LinearConfig(block_m=max(1, 1 << (m - 1).bit_length()), block_n=bn, nb=nb, split_k=sk, num_warps=w)
    for bm, bn, nb, sk, w, st in itertools.product((16, 32, 64, 128), (64, 128), (1, 2), (1, 2, 4), (4, 8), (3, 4)):
        if bm >= min(m, 16) and bm <= max(16, 2 * m):
            yield LinearConfig(block_m=bm, block_n=bn, nb=nb, use_dot=True, split_k=sk, num_warps=w, num_stages=st)


def run(args) -> list[list]:
    from bitlab_fx.ops.cuda import kernels
    from bitlab_fx.quant.packing import pack_ternary

    dev = torch.device("cuda")
    peak = _peak_gbs(torch.cuda.get_device_name(dev), args.peak_gbs)
    rows = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    for (k, n), m in itertools.product(shapes, args.m):
        torch.manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        wq = torch.randint(-1, 2, (n, k), device=dev, dtype=torch.int8)
        scale = torch.rand(n, device=dev) + 0.5
        if args.op == "ternary":
            weight, fn, wbytes = pack_ternary(wq), kernels.ternary_linear_triton, n * k // 4
        else:
            weight, fn, wbytes = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8), \
                kernels.int8_linear_triton, n * k
        w8 = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        s8 = torch.rand(n, device=dev, dtype=torch.bfloat16)
        t_bf16 = _bench(lambda: F.linear(x, w), args.graph)
        try:
            t_int8 = _bench(lambda: torch._weight_int8pack_mm(x, w8, s8), args.graph)
        except RuntimeError:
            t_int8 = float("nan")
        t_ours = _bench(lambda: fn(x, weight, scale), args.graph)
        tuned = []
        if args.autotune:
            from bitlab_fx.ops.cuda import set_autotune

            previous = set_autotune(True)
            try:
                fn(x, weight, scale)  # tunes this shape (outside any graph capture)
                t_tuned = _bench(lambda: fn(x, weight, scale), args.graph)
            finally:
                set_autotune(previous)
            tuned = [f"{t_tuned:.1f}", f"{t_bf16 / t_tuned:.2f}x"]
        best = ""
        if args.sweep or args.sweep_full:
            timed = []
            for cfg in _sweep_configs(m, n, k, args.sweep_full):
                try:
                    timed.append((_bench(lambda: fn(x, weight, scale, config=cfg), args.graph), cfg))
                except Exception:  # noqa: BLE001  (a config that does not compile or fit: skip it)
                    continue
            if timed:
                t_best, cfg = min(timed, key=lambda tc: tc[0])
                best = f"{t_best:.1f} us {cfg}"
        nbytes = wbytes + 4 * n + 2 * m * k + 2 * m * n
        gbs = nbytes / (t_ours * 1e-6) / 1e9
        rows.append([f"{k}x{n}", m, f"{t_bf16:.1f}", f"{t_int8:.1f}", f"{t_ours:.1f}", f"{t_bf16 / t_ours:.2f}x",
                     f"{t_int8 / t_ours:.2f}x", f"{gbs:.0f}", f"{100 * gbs / peak:.0f}%"] + tuned + ([best] if args.sweep or args.sweep_full else []))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=["ternary", "int8"], default="ternary")
    p.add_argument("--m", type=int, nargs="+", default=MS, help="token counts (rows of x)")
    p.add_argument("--no-graph", dest="graph", action="store_false", help="time plain launches, not CUDA graphs")
    p.add_argument("--sweep", action="store_true", help="also time the autotune candidates and report the best")
    p.add_argument("--sweep-full", action="store_true", help="also time a wide grid of tile configs (slow)")
    p.add_argument("--shapes", nargs="+", default=None, help="K x N shapes, e.g. 8192x8192 (default: all four)")
    p.add_argument("--autotune", action="store_true", help="also time the op with autotuning on (tuned us column)")
    p.add_argument("--peak-gbs", type=float, default=None, help="HBM peak for the %% column (default by GPU name)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_linear_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "for CPU numbers use benchmarks/bench_linear.py", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_linear_cuda.py needs triton: pip install 'bitlab-fx[cuda]'", file=sys.stderr)
        return 2
    from tabulate import tabulate

    rows = run(args)
    headers = ["K x N", "M", "bf16 us", "int8-wo us", f"bitlab {args.op} us", "vs bf16", "vs int8-wo", "GB/s",
               "% HBM"] + (["tuned us", "tuned vs bf16"] if args.autotune else []) + (["best config"] if args.sweep or args.sweep_full else [])
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{'CUDA-graph replays' if args.graph else 'plain launches'}; {datetime.date.today()}")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
