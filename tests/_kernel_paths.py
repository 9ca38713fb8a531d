"""The CPU kernel's paths on this machine (imported by name: ``from _kernel_paths import LIB, ISAS``); the ``isa``
fixture of tests/ops/conftest.py runs a test on each of them."""
from bitlab_fx.ops import cpu

LIB = cpu.kernel_library()
ISAS = [name for name in ("scalar", "avx2", "vnni", "neon", "dotprod", "i8mm")
        if LIB is not None and cpu.set_isa(name) == name]
if LIB is not None:
    cpu.set_isa(None)

# "+batched": the batched GEMM path (tokens in vector lanes) for every M, not only from its threshold up
PATHS = ISAS + [f"{name}+batched" for name in ISAS if name != "scalar"]

