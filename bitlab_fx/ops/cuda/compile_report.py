"""Compile the Triton kernels for an NVIDIA architecture without a GPU, and report what the machine code does.

Triton's compiler and ``ptxas``/``cuobjdump`` (shipped in the triton wheel) run on any Linux x86-64 machine, so
this checks the kernels for sm_80 / sm_90 where the interpreter cannot: that every config compiles, spills
nothing to local memory, fits shared memory, and uses the intended instructions (``IDP.4A`` in the decode
GEMV, integer tensor-core MMA for larger M), with the instruction count of the hot loop per weight::

    python -m bitlab_fx.ops.cuda.compile_report              # default configs, 8192x8192, sm_90
    python -m bitlab_fx.ops.cuda.compile_report --arch 80 --k 4096 --n 4096

Arguments are specialised like the JIT does at launch (pointers and integers divisible by 16 marked so),
so the code matches what a launch with those shapes compiles.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ...quant.packing import BLOCK, padded_k
from . import kernels as K

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)([.\w]*)")


def cuobjdump() -> str | None:
    """Path of the ``cuobjdump`` bundled with triton, or None."""
    path = os.path.join(_BIN, "cuobjdump")
    return path if os.access(path, os.X_OK) else None


@dataclass
class CompileReport:
    arch: int
    registers: int
    local_bytes: int  # > 0: register spills
    shared_bytes: int
    opcodes: collections.Counter = field(repr=False)  # whole kernel, by SASS opcode
    loop_opcodes: collections.Counter = field(repr=False)  # the largest loop body
    loads: collections.Counter = field(repr=False)  # LDG variants (LDG.E.128: 16-byte loads)
    mma: tuple = ()  # tensor-core instructions (IMMA, IGMMA, HMMA, HGMMA with their shapes)

    @property
    def loop_size(self) -> int:
        return sum(self.loop_opcodes.values())


def _sass_report(cubin: bytes, arch: int, shared: int) -> CompileReport:
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError(f"cuobjdump not found in {_BIN}: the triton wheel for this platform does not ship it")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    rows = [(int(m.group(1), 16), m.group(2), m.group(2) + m.group(3), line)
            for line in sass.splitlines() if (m := _LINE.match(line))]
    addrs = [r[0] for r in rows]
    loop = collections.Counter()
    for i, (addr, op, _, line) in enumerate(rows):  # backward branches close loops; keep the largest body
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", line)
        if op == "BRA" and target and target.group(1) and int(target.group(1), 16) < addr:
            start = addrs.index(int(target.group(1), 16))
            body = collections.Counter(r[1] for r in rows[start:i + 1])
            if sum(body.values()) > sum(loop.values()):
                loop = body
    return CompileReport(
        arch=arch, registers=int(re.search(r"REG:(\d+)", res).group(1)),
        local_bytes=int(re.search(r"LOCAL:(\d+)", res).group(1)), shared_bytes=shared,
        opcodes=collections.Counter(r[1] for r in rows), loop_opcodes=loop,
        loads=collections.Counter(r[2] for r in rows if r[1] == "LDG"),
        mma=tuple(sorted({r[2] for r in rows if r[1] in ("IMMA", "IGMMA", "HMMA", "HGMMA")})))


def compile_kernel(kernel, signature: dict, values: dict, constexprs: dict, num_warps: int, num_stages: int,
                   arch: int) -> CompileReport:
    """Compile ``kernel`` for ``sm_<arch>``: ``signature`` maps argument names to Triton types (``"*i8"``,
    ``"i32"``...), ``values`` gives the integer arguments (those divisible by 16 are specialised so, as at a
    launch; pointers are taken as 16-byte aligned, as fresh allocations are), ``constexprs`` the rest."""
    sig = dict(signature)
    attrs = {}
    for i, (name, ty) in enumerate(signature.items()):
        if ty.startswith("*") or values.get(name, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        sig[name] = "constexpr"
    names = list(sig)
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in constexprs.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return _sass_report(compiled.asm["cubin"], arch, compiled.metadata.shared)


def compile_linear(cfg: K.LinearConfig, m: int, n: int, k: int, packed: bool = True, ws_mode: int = K.WS_CHANNEL,
                   act_float: bool = False, dtype: str = "bf16", arch: int = 90, bias_codes: bool = False,
                   bias_bits: int = 0) -> CompileReport:
    """``_linear_kernel`` as ``_launch_linear`` would launch it for this problem and config (``bias_codes``: an
    IntBias's int32 codes in the bias slot; ``bias_bits``: the float bias quantized per token in the epilogue)."""
    cfg = K.fit_config(cfg, m, n, padded_k(k), 64 if ws_mode == K.WS_GROUP else 0)
    k_pad = padded_k(k)
    partial = cfg.split_k > 1
    iters = k_pad // (cfg.nb * BLOCK)
    signature = {"x_ptr": f"*{dtype}" if act_float else "*i8", "w_ptr": "*u8" if packed else "*i8",
                 "ws_ptr": "*fp32", "s_ptr": "*fp32", "bias_ptr": "*i32" if bias_codes else f"*{dtype}",
                 "out_ptr": ("*fp32" if act_float or ws_mode == K.WS_GROUP else "*i32") if partial else f"*{dtype}",
                 **{name: "i32" for name in ("M", "N", "K", "K_pad", "G", "GROUP_SIZE", "stride_xm", "stride_wn",
                                             "ITERS_PER_SPLIT")}}
    values = dict(M=m, N=n, K=k, K_pad=k_pad, G=k // 64 if ws_mode == K.WS_GROUP else 1,
                  GROUP_SIZE=64 if ws_mode == K.WS_GROUP else 1, stride_xm=k if act_float else k_pad,
                  stride_wn=k_pad // 4 if packed else k, ITERS_PER_SPLIT=-(-iters // cfg.split_k))
    words = K.uses_words(cfg, packed, act_float, k)
    constexprs = dict(PACKED=packed, ACT_FLOAT=act_float, WS_MODE=ws_mode, HAS_BIAS=True, WRITE_PARTIAL=partial,
                      USE_DOT=cfg.use_dot, WORDS=words, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NB=cfg.nb,
                      INTERPRET=False, ASM=True, BIAS_CODES=bias_codes, BIAS_BITS=bias_bits)
    return compile_kernel(K._linear_kernel, signature, values, constexprs, cfg.num_warps, cfg.num_stages, arch)


def compile_quant_act(k: int, mode: int = K.MODE_PER_TOKEN, dtype: str = "bf16", arch: int = 90) -> CompileReport:
    """``_quant_act_kernel`` for rows of ``k`` activations."""
    k_pad = padded_k(k)
    signature = {"x_ptr": f"*{dtype}", "xq_ptr": "*i8", "s_ptr": "*fp32", "src_ptr": "*fp32", "K": "i32",
                 "K_pad": "i32", "stride_xm": "i32"}
    block_k = min(4096, max(128, triton.next_power_of_2(k_pad)))
    return compile_kernel(K._quant_act_kernel, signature, dict(K=k, K_pad=k_pad, stride_xm=k),
                          dict(MODE=mode, BLOCK_K=block_k, INTERPRET=False, QMAX=127), 4, 3, arch)


def main(argv=None) -> int:
    from tabulate import tabulate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100/H200)")
    p.add_argument("--k", type=int, default=8192, help="in_features")
    p.add_argument("--n", type=int, default=8192, help="out_features")
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 8, 16, 64, 256])
    p.add_argument("--int8", action="store_true", help="int8 weights instead of packed ternary")
    args = p.parse_args(argv)
    rows = []
    for m in args.m:
        cfg = K.choose_config(m, args.n, padded_k(args.k))
        r = compile_linear(cfg, m, args.n, args.k, packed=not args.int8, arch=args.arch)
        per_thread = cfg.block_n * cfg.nb * BLOCK / (32 * cfg.num_warps)  # weights per thread per loop step
        rows.append([m, f"{cfg.block_m}x{cfg.block_n} nb{cfg.nb} sk{cfg.split_k} w{cfg.num_warps}",
                     "dot" if cfg.use_dot else "gemv", r.registers, r.local_bytes, r.shared_bytes,
                     " ".join(f"{k}:{v}" for k, v in sorted(r.loads.items())) or "(cp.async)",
                     " ".join(r.mma) or "IDP.4A x%d" % r.loop_opcodes.get("IDP", 0),
                     r.loop_size, f"{r.loop_size / per_thread:.2f}"])
    print(f"_linear_kernel for sm_{args.arch}, K={args.k}, N={args.n}, "
          f"{'int8' if args.int8 else 'ternary'} weights; triton {triton.__version__}")
    print(tabulate(rows, headers=["M", "config", "path", "regs", "spill B", "smem B", "global loads",
                                  "tensor core / dp4a", "loop instrs", "loop instrs / weights per thread"],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
