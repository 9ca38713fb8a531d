"""What one converted-layer call costs at M = 1 beyond its kernel: the Python and dispatch overhead.

    python benchmarks/bench_call_overhead.py            # 64x64 (kernel ~1 us) and 576x576 (SmolLM2's q_proj)

For each layer: the C kernel alone (ctypes, the floor), the layer as a converted model runs it in eager
inference (a converted GraphModule: direct kernel call), the op through torch's dispatcher under
``no_grad`` and under ``inference_mode``, and fp32 ``nn.Linear`` for scale. Overhead = call - kernel.
Medians of 7 rounds of 3000 calls, rounds interleaved; threads as shipped (``torch.get_num_threads()``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.ops import cpu


def _per_call_us(case, calls: int) -> float:
    fn, mode = case
    with mode():  # entered once per round, not per call
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6


def _cases(k: int, n: int):
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(k, n, bias=False)).eval()
    cm = bfx.convert(bfx.prepare_qat(fp32, bfx.ternary()).eval())
    layer = cm.get_submodule("0")
    w, s = layer.packed_weight, layer.weight_scale
    x = torch.randn(1, k)
    out = torch.empty(1, n)
    lib = cpu.kernel_library()
    threads = torch.get_num_threads()
    op = torch.ops.bitlab.ternary_linear.default

    def kernel():
        lib.bitlab_linear(x.data_ptr(), 1, k, w.data_ptr(), 0, n, s.data_ptr(), 1, 1, None, 0, 0.0, out.data_ptr(),
                          threads)

    def op_call():
        return op(x, w, s, None, "per_token", None, k)

    return {"C kernel alone": (kernel, torch.no_grad),
            "converted model (eager, no_grad)": (lambda: cm(x), torch.no_grad),
            "container called directly (no_grad)": (lambda: layer(x), torch.no_grad),
            "op via dispatcher, no_grad": (op_call, torch.no_grad),
            "op via dispatcher, inference_mode": (op_call, torch.inference_mode),
            "fp32 nn.Linear (no_grad)": (lambda: fp32(x), torch.no_grad)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="64x64,576x576", help="KxN layers")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    if cpu.kernel_library() is None:
        raise SystemExit("the CPU kernel could not be built here")
    print(f"batch 1, ternary, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds of {args.calls} calls, medians (min-max) in us per call")
    print("| layer | call | us per call | overhead over the kernel |")
    print("| --- | --- | ---: | ---: |")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        cases = _cases(k, n)
        for case in cases.values():
            _per_call_us(case, 200)  # warm-up
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, case in cases.items():
                times[name].append(_per_call_us(case, args.calls))
        floor = statistics.median(times["C kernel alone"])
        for name, ts in times.items():
            med = statistics.median(ts)
            extra = "" if name.startswith(("C kernel", "fp32")) else f"{med - floor:.1f}"
            print(f"| {k}x{n} | {name} | {med:.1f} ({min(ts):.1f}-{max(ts):.1f}) | {extra} |")


if __name__ == "__main__":
    main()
