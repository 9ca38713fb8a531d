"""Estimate the CPU kernel's inner loops with llvm-mca, ARM64 and x86 side by side (no ARM machine needed).

The kernel's source (``_build.amalgamate()``) is compiled to assembly with the production flags by
``aarch64-linux-gnu-gcc`` and by the x86 ``gcc``; in each loop function of :data:`LOOPS` the innermost loop with
the most multiply instructions is cut out and given to ``llvm-mca -mtriple=... -mcpu=...``, which simulates it
on that core's scheduling model (operands in L1, no memory stalls, branches predicted). From its cycles per
iteration and the multiplies in the body it reports int8 multiply-adds (MACs) per cycle and, for the decode
loops, the time one 4096x4096 layer at batch 1 would take on one core at the clock given in :data:`CLOCK_GHZ`.

These are estimates of the compute bound only. ``--measure`` also times the x86 loops on this machine through
the public op (one thread, a 4096x4096 layer whose packed weight stays in the last-level cache), for the ratio of
measured to estimated speed that the ARM figures can be read against. On a real ARM machine, measure instead::

    python benchmarks/bench_linear.py --quick

Run::

    python benchmarks/arm_mca.py [--measure] [--llvm-mca llvm-mca-16]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitlab_fx.ops.cpu import _build  # noqa: E402

# (what, architecture, function in the assembly, cores): the loops the ARM64 paths run and their x86 counterparts
LOOPS = [
    ("ternary decode, sdot", "aarch64", "tern_rows_dot_4", ("apple-m1", "neoverse-v1")),
    ("ternary decode, plain NEON", "aarch64", "tern_rows_neon_4", ("apple-m1", "neoverse-v1", "cortex-a72")),
    ("int8 decode, sdot", "aarch64", "i8_rows_dot_4", ("apple-m1", "neoverse-v1")),
    ("int4 decode, sdot", "aarch64", "i4_rows_dot_4", ("apple-m1", "neoverse-v1")),
    ("batched GEMM 8x8, sdot", "aarch64", "panel_dot", ("apple-m1", "neoverse-v1", "neoverse-v2")),
    ("batched GEMM 4x8, plain NEON", "aarch64", "panel_neon", ("apple-m1", "neoverse-v1", "cortex-a72")),
    ("batched GEMM 8x8, smmla (i8mm)", "aarch64", "panel_mmla", ("neoverse-v1", "neoverse-v2")),
    ("ternary decode, AVX2", "x86_64", "decode_avx2", ("znver3", "icelake-server")),
    ("ternary decode, AVX-512 VNNI", "x86_64", "decode_vnni", ("icelake-server",)),
    ("int8 decode, AVX2", "x86_64", "decode_i8_avx2", ("znver3", "icelake-server")),
    ("int4 decode, AVX2", "x86_64", "decode_i4_avx2", ("znver3", "icelake-server")),
    ("batched GEMM 4x16, AVX2", "x86_64", "panel_avx2", ("znver3", "icelake-server")),
    ("batched GEMM 12x32, AVX-512 VNNI", "x86_64", "panel_v512", ("icelake-server",)),
]
# nominal clocks for the time column: M1 P-core, Graviton3 (Neoverse V1), Graviton4 (V2), Raspberry Pi 4 (A72),
# this VM's EPYC (Zen 3, /proc/cpuinfo "cpu MHz"), a Xeon Ice Lake server
CLOCK_GHZ = {"apple-m1": 3.2, "neoverse-v1": 2.6, "neoverse-v2": 2.8, "cortex-a72": 1.8, "znver3": 2.45,
             "icelake-server": 3.0}
COMPILERS = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "gcc"}
# int8 multiply-adds per instruction (x86: by vector width)
MACS = {"sdot": 16, "smmla": 32, "smull": 8, "smull2": 8, "vpdpbusd": 32, "vpmaddubsw": 32}
_BRANCH = re.compile(r"^\s+(b[\w.]*|cbn?z|tbn?z|j\w+)\s+(?:\S+,\s*)*(\.L\w+)\s*$")


def assembly(arch: str, source: Path, out: Path) -> str:
    cmd = [COMPILERS[arch]] + _build.CFLAGS + _build.OPENMP + ["-S", str(source), "-o", str(out)]
    subprocess.run(cmd, check=True)
    return out.read_text()


def function_lines(asm: str, name: str):
    lines = asm.splitlines()
    start = next(i for i, line in enumerate(lines) if line == f"{name}:")
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(f".size\t{name},"))
    return lines[start:end]


def macs_of(line: str) -> int:
    parts = line.split()
    if not parts or parts[0] not in MACS:
        return 0
    return MACS[parts[0]] * (2 if "%zmm" in line else 1)


def hot_loop(lines):
    """The innermost loop (a label and a later branch back to it, with no loop inside) with the most MACs."""
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.L\w+:$", line)}
    loops = []
    for j, line in enumerate(lines):
        m = _BRANCH.match(line)
        if m and m.group(2) in labels and labels[m.group(2)] < j:
            loops.append((labels[m.group(2)], j))
    inner = [(a, b) for a, b in loops if not any(a < c and d <= b and (c, d) != (a, b) for c, d in loops)]
    a, b = max(inner, key=lambda ab: sum(macs_of(x) for x in lines[ab[0]:ab[1] + 1]))
    body = [x for x in lines[a + 1:b + 1] if x.strip() and not x.strip().startswith((".", "#", "//"))
            and not re.match(r"^\.?L\w+:$", x)]
    return body, sum(macs_of(x) for x in body)


def mca(tool: str, arch: str, cpu: str, body) -> float:
    """Cycles per iteration (llvm-mca's total cycles over its iterations)."""
    attrs = ["-mattr=+dotprod,+i8mm"] if arch == "aarch64" and cpu != "cortex-a72" else []
    text = "\n".join(body).replace("\t", " ") + "\n"
    res = subprocess.run([tool, f"-mtriple={arch}", f"-mcpu={cpu}", "-iterations=300"] + attrs,
                         input=text, capture_output=True, text=True, check=True)
    total = int(re.search(r"Total Cycles:\s+(\d+)", res.stdout).group(1))
    iters = int(re.search(r"Iterations:\s+(\d+)", res.stdout).group(1))
    return total / iters


def measure_x86() -> dict:
    """MACs per cycle of the x86 decode paths on this machine: one thread, a 4096x4096 layer at M = 1 (packed
    weight in the last-level cache), the median of 7 rounds of 200 calls, at CLOCK_GHZ['znver3']."""
    import statistics

    import torch

    from bitlab_fx.ops import cpu
    from bitlab_fx.quant.packing import pack_int4, pack_ternary

    torch.set_num_threads(1)
    n = k = 4096
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, generator=g)
    ws = torch.rand(n, generator=g) + 0.5
    def codes(q):
        return torch.randint(-q, q + 1, (n, k), generator=g, dtype=torch.int8)

    weights = {  # (op, stored weight, in_features argument)
        "ternary decode, AVX2": (torch.ops.bitlab.ternary_linear, pack_ternary(codes(1)), (k,)),
        "int8 decode, AVX2": (torch.ops.bitlab.int8_linear, codes(127), ()),
        "int4 decode, AVX2": (torch.ops.bitlab.int4_linear, pack_int4(codes(7)), (k,)),
    }
    cpu.set_isa("avx2")
    out = {}
    for what, (op, w, extra) in weights.items():
        def call():
            return op(x, w, ws, None, "per_token", None, *extra)
        for _ in range(20):
            call()
        rounds = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(200):
                call()
            rounds.append((time.perf_counter() - t0) / 200)
        sec = statistics.median(rounds)
        out[what] = (n * k / (sec * CLOCK_GHZ["znver3"] * 1e9), sec * 1e6, min(rounds) * 1e6, max(rounds) * 1e6)
    cpu.set_isa(None)
    return out


def newest_llvm_mca() -> str:
    """The llvm-mca of the highest version on the PATH (llvm-mca-N, else llvm-mca)."""
    found = {}
    for d in os.environ.get("PATH", "").split(os.pathsep):
        for p in Path(d).glob("llvm-mca-*") if Path(d).is_dir() else ():
            if re.fullmatch(r"llvm-mca-\d+", p.name):
                found[int(p.name.rsplit("-", 1)[1])] = p.name
    return found[max(found)] if found else "llvm-mca"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llvm-mca", default=newest_llvm_mca(),
                    help="llvm-mca 17+ has a Neoverse V1 model (16 runs -mcpu=neoverse-v1 on its N2 model)")
    ap.add_argument("--measure", action="store_true", help="also time the x86 decode loops on this machine")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.c"
        source.write_text(_build.amalgamate())
        asm = {arch: assembly(arch, source, Path(tmp) / f"{arch}.s") for arch in COMPILERS}
        for what, arch, fn, cpus in LOOPS:
            body, macs = hot_loop(function_lines(asm[arch], fn))
            for cpu in cpus:
                cycles = mca(args.llvm_mca, arch, cpu, body)
                per_cycle = macs / cycles
                us = 4096 * 4096 / (per_cycle * CLOCK_GHZ[cpu] * 1e3) if "decode" in what else None
                rows.append((what, cpu, len(body), macs, cycles, per_cycle, us))
    measured = measure_x86() if args.measure else {}
    version = subprocess.run([args.llvm_mca, "--version"], capture_output=True, text=True).stdout
    print(f"llvm-mca: {re.search(r'version ([0-9.]+)', version).group(1)}; gcc: aarch64-linux-gnu-gcc and gcc, "
          f"flags {' '.join(_build.CFLAGS)}")
    print("| loop | core (-mcpu) | instructions | MACs / iteration | cycles / iteration | MACs / cycle | "
          "4096x4096 at M = 1, one core (us, at GHz) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for what, cpu, n_ins, macs, cycles, per_cycle, us in rows:
        t = f"{us:.0f} at {CLOCK_GHZ[cpu]}" if us is not None else ""
        print(f"| {what} | {cpu} | {n_ins} | {macs} | {cycles:.2f} | {per_cycle:.1f} | {t} |")
    for what, (per_cycle, med, lo, hi) in measured.items():
        est = next(r[5] for r in rows if r[0] == what and r[1] == "znver3")
        print(f"measured on this machine, {what}: {med:.0f} us ({lo:.0f}..{hi:.0f}), {per_cycle:.1f} MACs/cycle at "
              f"{CLOCK_GHZ['znver3']} GHz = {per_cycle / est:.2f}x the znver3 estimate")


if __name__ == "__main__":
    main()
