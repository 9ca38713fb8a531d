"""The x86 AVX-512 VNNI decode loops (decode.c, decode_groups.c) and small-M tiles (tiles_vnni.c) on any AVX2 CPU:
their source with ``vpdpbusd`` replaced by an AVX2 emulation (the same sums: four u8 x s8 products per int32 lane,
added with wraparound) and compiled for AVX2, the ISA forced to VNNI, run by the ARM test's driver
(tests/ops/cpu_arm_driver.c, built natively) on one token (M = 1; the batched GEMM's zmm tiles cannot run here and
are not used at M = 1) against reference.py bit for bit: per-channel and per-group scales of every format, ragged
tiles, xq = -128, two threads. On a CPU with VNNI the real instructions also run in test_cpu_group_decode.py; this
checks the VNNI loops' logic where the CPU lacks them (AMD Zen 3, the CI machines)."""
import platform
import re
import shutil
import struct
import subprocess

import pytest

from bitlab_fx.ops.cpu import _build

import test_cpu_arm as arm  # the case writer and the driver's source

GCC = shutil.which("gcc") or shutil.which("cc")
pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not GCC,
                                reason="x86-64 with a C compiler only")

# (format, K, N, scales, act, float bias, threads): M = 1 only
SHAPES = [(fmt, k, n, scales, act, bias, threads)
          for fmt, k, scale_list in (("int4", 576, ("group32", "group64", "group96", "channel")),
                                     ("int4", 160, ("group32", "tensor")),
                                     ("ternary", 384, ("group128", "group32", "group64", "channel")),
                                     ("int8", 576, ("group32", "group64", "group12", "channel")))
          for scales in scale_list
          for n, act, bias, threads in ((7, "static", False, 1), (13, "per_tensor", True, 1),
                                        (301, "per_token", True, 2))]

_EMULATION = """static inline __attribute__((always_inline, target("avx2"))) __m256i emu_dpbusd(__m256i acc, __m256i u,
                                                                                       __m256i s) {
    const __m256i ulo = _mm256_and_si256(u, _mm256_set1_epi16(0xff)), uhi = _mm256_srli_epi16(u, 8);
    const __m256i slo = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), shi = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ulo, slo), _mm256_madd_epi16(uhi, shi)));
}
"""


def _emulated_source() -> str:
    """The kernel's amalgamation with the VNNI loops' files compiled for AVX2 with emu_dpbusd, VNNI detected."""
    pieces = re.split(r'(#line 1 "[^"]+"\n)', _build.amalgamate())
    out, current = [], None
    for piece in pieces:
        marker = re.match(r'#line 1 "([^"]+)"\n', piece)
        if marker:
            current = marker.group(1)
        elif current in ("decode.c", "decode_groups.c", "tiles_vnni.c"):
            piece = piece.replace("TGT_VNNI", "TGT_AVX2").replace("_mm256_dpbusd_epi32(", "emu_dpbusd(")
        elif current == "bitlab_cpu.h":
            piece = piece.replace("#define TGT_VNNI", _EMULATION + "#define TGT_VNNI", 1)
        elif current == "bitlab_cpu.c":
            piece = piece.replace("        return ISA_AVX2;\n    }", "        return ISA_VNNI;\n    }", 1)
        out.append(piece)
    source = "".join(out)
    assert "emu_dpbusd(a" in source and source.count("return ISA_VNNI;") == 2, "the kernel source changed shape"
    return source


def test_vnni_decode_loops_emulated_match_reference_bitwise(tmp_path):
    cases = [arm._case(i, fmt, 1, k, n, scales, act, bias, "", threads)
             for i, (fmt, k, n, scales, act, bias, threads) in enumerate(SHAPES)]
    (tmp_path / "cases.bin").write_bytes(struct.pack("<i", len(cases)) + b"".join(cases))
    driver = arm.DRIVER.read_text().replace("batched < 2; batched++", "batched < 1; batched++")  # built-in paths only
    (tmp_path / "driver.c").write_text(_emulated_source() + '#line 1 "cpu_arm_driver.c"\n' + driver)
    exe = tmp_path / "driver"
    cmd = [GCC] + _build.CFLAGS + _build.OPENMP + [str(tmp_path / "driver.c"), "-o", str(exe), "-lm"]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([str(exe), str(tmp_path / "cases.bin"), "2"], capture_output=True, text=True, timeout=600)
    lines = ran.stdout.splitlines()
    assert lines[:2] == ["best_isa 2", "isa 2 got 2"], ran.stdout[-2000:]
    assert ran.returncode == 0 and lines[-1] == f"checked {len(SHAPES)} failed 0", ran.stdout[-4000:] + ran.stderr[-2000:]
