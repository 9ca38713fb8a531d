"""The ARM64 paths of the CPU kernel (isa_arm.c, decode_neon.c, gemm_neon.c), tested on x86 under emulation: the
kernel's source is cross-compiled with a small driver (tests/ops/cpu_arm_driver.c) by aarch64-linux-gnu-gcc and run
under qemu-aarch64 on emulated CPUs with the dot product and i8mm (``-cpu max``), with the dot product only
(``-cpu neoverse-n1``: detection) and with neither (``-cpu cortex-a53``). Every ARM path (scalar, plain NEON, sdot,
smmla; the decode loops, the batched GEMM, the scalar tiles) must give reference.py's outputs bit for bit on shapes
with tails, odd K, per-group scales (at M = 1 too: the decode loops' groups), int4, int8, ternary, xq = -128, integer bias codes (stored, or quantized per
token), ragged token tiles, a row of more than 16384 blocks and two threads.

The driver is built twice: by aarch64-linux-gnu-gcc with OpenMP (the Linux aarch64 build) and by clang
``--target=aarch64-linux-gnu`` without OpenMP (the compiler, code and threading of a macOS build without libomp).

Tools: Debian packages gcc-aarch64-linux-gnu, qemu-user and clang (CI's .ci/run installs them and sets
BITLAB_FX_REQUIRE_ARM_TESTS=1, so there they can never be skipped); ``$BITLAB_FX_ARM_CC``, ``$BITLAB_FX_ARM_CLANG``
and ``$BITLAB_FX_QEMU_AARCH64`` name others. On a machine without them the tests skip and say what to install."""
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from bitlab_fx.ops import reference
from bitlab_fx.ops.cpu import _build
from bitlab_fx.quant.packing import pack_int4, pack_ternary

DRIVER = Path(__file__).with_name("cpu_arm_driver.c")
ISA = {"scalar": 0, "avx2": 1, "neon": 3, "dotprod": 4, "i8mm": 5}  # bitlab_cpu.h ISA_* numbers
WFMT = {"ternary": 0, "int8": 1, "int4": 2}
ACT = {"per_token": 0, "per_tensor": 1, "static": 2}
QMAX = {"ternary": 1, "int8": 127, "int4": 8}


def _tool(env: str, names) -> str:
    given = os.environ.get(env)
    if given:
        return shutil.which(given) or ""
    for name in names:
        if shutil.which(name):
            return shutil.which(name)
    return ""


CC = _tool("BITLAB_FX_ARM_CC", ("aarch64-linux-gnu-gcc",))
CLANG = _tool("BITLAB_FX_ARM_CLANG", ("clang",))  # with --target=aarch64-linux-gnu: the macOS compiler's code
QEMU = _tool("BITLAB_FX_QEMU_AARCH64", ("qemu-aarch64", "qemu-aarch64-static"))
TOOLS = {"aarch64-linux-gnu-gcc (apt: gcc-aarch64-linux-gnu)": CC, "qemu-aarch64 (apt: qemu-user)": QEMU,
         "clang (apt: clang)": CLANG}


def _require_tools(*names):
    missing = [what for what, path in TOOLS.items() if not path and what.split()[0] in names]
    if not missing:
        return
    message = f"ARM64 emulation tests need {' and '.join(missing)}"
    if os.environ.get("BITLAB_FX_REQUIRE_ARM_TESTS") == "1":
        pytest.fail(message + " (BITLAB_FX_REQUIRE_ARM_TESTS=1: CI must run them)")
    pytest.skip(message)


# (format, M, K, N, scales, act, float bias, integer bias, threads): decode (M = 1), the batched GEMM (M >= 2; 8-token
# tiles, ragged at 5, 9, 17), per-group scales (int8 groups of 12 start off a 4-k step; of 10 take the scalar
# tiles; int4 groups of 32 run as int8), K with tails (odd, < 16 past a 32-chunk, not a multiple of 128), N not a
# multiple of the 4/8-row blocks, static multipliers that clamp inputs to -128. Integer biases: "codes" (stored
# int32 codes) or "tokN" (the float bias quantized per token to N bits and added to the sums).
SHAPES = [
    ("ternary", 1, 128, 8, "channel", "per_token", True, "", 1),
    ("ternary", 1, 300, 13, "tensor", "per_tensor", False, "codes", 2),
    ("ternary", 1, 1000, 21, "channel", "static", True, "", 1),
    ("ternary", 1, 256, 7, "group64", "per_token", True, "", 1),
    ("ternary", 2, 300, 13, "channel", "per_token", False, "codes", 1),
    ("ternary", 5, 384, 9, "group64", "per_token", True, "", 2),
    ("ternary", 9, 130, 17, "tensor", "static", True, "", 1),
    ("ternary", 17, 640, 24, "channel", "per_tensor", False, "", 2),
    ("int8", 1, 67, 13, "channel", "per_token", True, "", 1),
    ("int8", 1, 100, 8, "tensor", "static", False, "codes", 1),
    ("int8", 1, 300, 21, "channel", "static", True, "", 2),
    ("int8", 1, 96, 5, "group32", "per_token", False, "", 1),
    ("int8", 3, 36, 11, "group12", "per_token", True, "", 1),
    ("int8", 4, 30, 6, "group10", "static", False, "", 1),
    ("int8", 8, 255, 9, "channel", "static", True, "codes", 1),
    ("int8", 17, 129, 16, "tensor", "per_tensor", False, "", 2),
    ("int4", 1, 64, 8, "channel", "per_token", True, "", 1),
    ("int4", 1, 67, 13, "tensor", "static", False, "codes", 1),
    ("int4", 1, 300, 21, "channel", "per_token", True, "", 2),
    ("int4", 1, 256, 6, "group64", "per_token", False, "", 1),
    ("int4", 2, 130, 9, "channel", "static", True, "", 1),
    ("int4", 5, 192, 7, "group32", "per_token", True, "", 1),
    ("int4", 9, 256, 12, "group64", "per_tensor", False, "", 2),
    ("int4", 17, 331, 19, "channel", "per_token", False, "codes", 1),
    ("ternary", 1, 200, 9, "channel", "per_token", True, "tok8", 1),
    ("int8", 6, 64, 10, "channel", "per_tensor", True, "tok16", 1),
    ("int4", 1, 130, 5, "tensor", "per_token", True, "tok4", 1),
    # M = 1 with per-group scales in the decode loops (groups of whole units: int4 32-k halves, int8 any k, ternary
    # 128-blocks): one half per group (K = 160: a last chunk of one half), three halves, whole chunks, odd N, two
    # threads that share the rows (the last case has enough work), xq = -128
    ("int4", 1, 160, 7, "group32", "per_token", True, "", 1),
    ("int4", 1, 288, 13, "group96", "static", False, "", 1),
    ("int4", 1, 576, 9, "group64", "per_tensor", True, "", 2),
    ("ternary", 1, 384, 13, "group128", "per_token", True, "", 1),
    ("ternary", 1, 512, 5, "group256", "static", False, "", 1),
    ("int8", 1, 576, 9, "group64", "static", True, "", 1),
    ("int8", 1, 60, 7, "group12", "per_token", True, "", 1),
    ("int4", 1, 1024, 201, "group32", "per_token", True, "", 2),
    # > 16384 128-blocks: the sdot ternary decode sums its 4^r-scaled chains in parts (DECODE_MAX_RUNS)
    ("ternary", 1, 128 * 16384 + 384, 5, "channel", "per_token", False, "", 2),
]


def _case(index, fmt, m, k, n, scales, act, with_bias, int_bias, threads):
    g = torch.Generator().manual_seed(1000 + index)
    q = QMAX[fmt]
    wq = torch.randint(-q, q + (fmt != "int4"), (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(m, k, generator=g) * 3
    x[:, ::7] *= 40  # big values: with a static multiplier they clamp to -128 / 127
    if scales.startswith("group"):
        groups = k // int(scales[5:])
        ws = torch.rand(n, groups, generator=g) / 64 + 1e-3
    else:
        ws = torch.rand(n if scales == "channel" else 1, generator=g) / 64 + 1e-3
    bias = torch.randn(n, generator=g) * 4 if with_bias else None
    codes = torch.randint(-(2 ** 16), 2 ** 16, (n,), generator=g, dtype=torch.int32) if int_bias == "codes" else None
    bias_bits = int(int_bias[3:]) if int_bias.startswith("tok") else 0
    static = torch.tensor([2.0]) if act == "static" else None
    if static is not None:  # exact halves x * 2 = j + 0.5: rounding ties (to even)
        ties = x[:, 1::11]
        ties.copy_((torch.arange(ties.numel()).reshape(ties.shape) % 60 - 30 + 0.5) / 2)
    ref_act = "per_tensor" if act == "static" else act
    stored = {"ternary": pack_ternary, "int4": pack_int4, "int8": lambda w: w}[fmt](wq)
    fn = {"ternary": reference.ternary_linear, "int4": reference.int4_linear, "int8": reference.int8_linear}[fmt]
    extra = {} if fmt == "int8" else {"in_features": k}
    expected = fn(x, stored, ws, bias, ref_act, static, bias_codes=codes, bias_bits=bias_bits, **extra)
    if act == "static":
        assert (reference.quantize_int8(x, static) == -128).any()  # the case covers xq = -128
    kind = 2 if ws.dim() == 2 else (1 if ws.numel() == n and n > 1 else 0)
    name = f"{fmt}-M{m}-K{k}-N{n}-{scales}-{act}{'-bias' if with_bias else ''}-{int_bias or 'noint'}-t{threads}"
    out = [struct.pack("<7i", WFMT[fmt], kind, ACT[act], bias is not None, codes is not None, bias_bits, threads),
           struct.pack("<6q", m, k, n, ws.shape[1] if kind == 2 else 1, stored.numel(), ws.numel()),
           struct.pack("<f", float(static) if static is not None else 0.0), name.encode()[:63].ljust(64, b"\0"),
           x.contiguous().numpy().tobytes(), stored.contiguous().numpy().tobytes(),
           ws.float().contiguous().numpy().tobytes()]
    if bias is not None:
        out.append(bias.numpy().tobytes())
    if codes is not None:
        out.append(codes.numpy().tobytes())
    out.append(expected.float().contiguous().numpy().tobytes())
    return b"".join(out)


@pytest.fixture(scope="module")
def arm_work(tmp_path_factory):
    """A directory with the cases file and the driver's source (the kernel's amalgamation + cpu_arm_driver.c)."""
    _require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    work = tmp_path_factory.mktemp("arm64")
    (work / "cases.bin").write_bytes(struct.pack("<i", len(SHAPES)) +
                                     b"".join(_case(i, *s) for i, s in enumerate(SHAPES)))
    (work / "driver.c").write_text(_build.amalgamate() + '#line 1 "cpu_arm_driver.c"\n' + DRIVER.read_text())
    return work


def _compile(work, compiler, flags, name):
    driver = work / name
    cmd = compiler + _build.CFLAGS + flags + ["-static", str(work / "driver.c"), "-o", str(driver), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-3000:]}"
    return driver, work / "cases.bin"


@pytest.fixture(scope="module")
def arm_driver(arm_work):
    """The driver built by the Linux aarch64 compiler (gcc, with OpenMP): (driver path, cases path)."""
    return _compile(arm_work, [CC], _build.OPENMP, "driver")


def _run(arm_driver, cpu, isas):
    driver, cases = arm_driver
    cmd = [QEMU, "-cpu", cpu, str(driver), str(cases)] + [str(ISA[name]) for name in isas]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and lines and lines[-1].endswith("failed 0"), res.stdout[-4000:] + res.stderr[-2000:]
    selected = dict(tuple(map(int, line.split()[1::2])) for line in lines if line.startswith("isa "))
    return int(lines[0].split()[1]), selected, lines[-1]


def test_a_cpu_with_i8mm_runs_every_arm_path_bit_for_bit(arm_driver):
    names = ("scalar", "neon", "dotprod", "i8mm")
    best, selected, summary = _run(arm_driver, "max", names)
    assert best == ISA["i8mm"]  # getauxval: HWCAP_ASIMDDP and HWCAP2_I8MM
    assert selected == {ISA[name]: ISA[name] for name in names}
    assert summary == f"checked {len(names) * 2 * len(SHAPES)} failed 0"  # x (built-in path, batched forced)


def test_a_cpu_with_dot_product_but_no_i8mm_picks_sdot(arm_driver):
    best, selected, summary = _run(arm_driver, "neoverse-n1", ["i8mm"])
    assert best == ISA["dotprod"]
    assert selected == {ISA["i8mm"]: ISA["dotprod"]}  # clamped: nothing run
    assert summary == "checked 0 failed 0"


def test_a_cpu_without_dot_product_picks_plain_neon(arm_driver):
    best, selected, summary = _run(arm_driver, "cortex-a53", ["neon", "dotprod", "avx2"])
    assert best == ISA["neon"]
    assert selected == {ISA["neon"]: ISA["neon"], ISA["dotprod"]: ISA["neon"], ISA["avx2"]: ISA["neon"]}  # clamped
    assert summary == f"checked {2 * len(SHAPES)} failed 0"


def test_clang_builds_the_arm_paths_bit_for_bit_without_openmp(arm_work):
    """clang, as Apple's compiles the kernel on macOS: sdot and smmla as inline assembly (bitlab_cpu.h), no OpenMP
    (one thread), every ARM path."""
    _require_tools("clang")
    driver = _compile(arm_work, [CLANG, "--target=aarch64-linux-gnu"], [], "driver-clang")
    names = ("scalar", "neon", "dotprod", "i8mm")
    best, selected, summary = _run(driver, "max", names)
    assert best == ISA["i8mm"] and selected == {ISA[name]: ISA[name] for name in names}
    assert summary == f"checked {len(names) * 2 * len(SHAPES)} failed 0"
