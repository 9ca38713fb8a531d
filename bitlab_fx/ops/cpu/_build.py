"""Build the C kernel (``bitlab_cpu.c`` and the files of :data:`FILES`) with the system C compiler into a
per-user cache, once per source/flags/CPU.

The library is compiled on first use (never at ``import bitlab_fx``) into
``$BITLAB_FX_CACHE_DIR`` or ``$XDG_CACHE_HOME/bitlab_fx`` or ``~/.cache/bitlab_fx``, under a name
keyed by the source hash (of every file), the compiler, the flags and the CPU features.

The files are joined into one translation unit's text (:func:`amalgamate`: each file after a ``#line``
marker, so diagnostics name the file and line), which compiles as two jobs in parallel
(``-DBITLAB_PART=1/2``: each job keeps the files :data:`FILES` assigns to it), then links. Two jobs, not
one per file: ``immintrin.h`` alone takes ~0.4 s of CPU to compile at -O3, which every job pays again,
and the first call of an op waits for this build. Output goes to a temporary file in the same directory and is
moved into place with ``os.replace``, so concurrent first uses all succeed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Tuple

HERE = Path(__file__).parent
# The kernel's files, in the order they form one translation unit, each with the compile job that builds
# it (0: both, the shared header). The assignment balances the two jobs' compile times (gcc 12, -O3, CPU
# seconds beyond the header's ~0.4: tiles.c 1.15, tiles_vnni.c 0.7, decode.c 0.6, weight_only.c 0.4,
# gemm.c 0.3, bitlab_cpu.c 0.25, conv.c 0.1); a file moved or added should keep them about even.
FILES = (
    ("bitlab_cpu.h", 0),   # shared types, macros, inline helpers, cross-file declarations
    ("quant.c", 2),        # activation quantization (scalar, AVX2): max |x|, codes, code sums
    ("train_quant.c", 2),  # a QAT step's quantizers, one pass per tensor: weight codes; activation multipliers + codes
    ("bitlab_cpu.c", 2),   # ABI, ISA, job and threads, bitlab_linear(_q)
    ("tiles.c", 1),        # small M: scalar and AVX2 register tiles, dot_tile, gemm_cols
    ("tiles_vnni.c", 2),   # small M: VNNI register tiles
    ("decode.c", 2),       # M == 1: the decode loops
    ("decode_groups.c", 1),  # M == 1 with per-group scales: the choice of loop, the int4 / small-group loops
    ("gemm.c", 2),         # the batched GEMM
    ("weight_only.c", 1),  # act = "none": bitlab_linear_wo, bitlab_expand_wo
    ("conv.c", 1),         # bitlab_im2col_s8
    ("isa_arm.c", 1),      # ARM64: which ISA the CPU has (the ARM64 files compile to nothing on x86)
    ("quant_neon.c", 2),   # ARM64: activation quantization (max |x|, codes, code sums)
    ("decode_neon.c", 2),  # ARM64, M == 1: the decode loops (NEON, sdot)
    ("gemm_neon.c", 1),    # ARM64: the batched GEMM's micro-kernels and row unpacking
)
PARTS = (1, 2)
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"\n]+)"[^\n]*', re.M)
# -ffp-contract=off: no FMA contraction, so the fp32 rescale rounds exactly like reference.py.
# -fno-tree-vectorize: the hot loops are written with intrinsics; gcc's auto-vectoriser only added
# compile time (~15% of the first-use build, which targets ~2 s on 2 cores) and no measurable speed.
CFLAGS = ["-O3", "-fno-tree-vectorize", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-std=gnu11"]
OPENMP = ["-fopenmp"]
_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "neon", "asimd",
              "asimddp", "i8mm")


class BuildError(RuntimeError):
    pass


def amalgamate() -> str:
    """The text of :data:`FILES` as one translation unit: what the build compiles and hashes.

    Each file follows a ``#line 1 "name"`` marker, with its ``#include`` of another file of FILES blanked
    (the header comes first; blank, not removed, so line numbers stay right); each file of job p is
    wrapped in ``#if BITLAB_PART == 0 || BITLAB_PART == p``, so ``-DBITLAB_PART=p`` compiles job p and
    no ``BITLAB_PART`` compiles the whole library in one job."""
    names = {name for name, _ in FILES}
    out = []
    for name, part in FILES:
        try:
            text = (HERE / name).read_text(encoding="utf-8")
        except OSError as e:
            raise BuildError(f"kernel source {HERE / name} unreadable ({e})") from e
        text = _LOCAL_INCLUDE.sub(lambda m: "" if m.group(1) in names else m.group(0), text)
        if not text.endswith("\n"):
            text += "\n"
        if part:
            out.append(f"#if BITLAB_PART == 0 || BITLAB_PART == {part}\n")
        out.append(f'#line 1 "{name}"\n{text}')
        if part:
            out.append(f"#endif /* {name} */\n")
    return "".join(out)


class _Source:
    """The kernel's source as the one text the build compiles (:func:`amalgamate`), readable like the
    single file (``bitlab_cpu.c``) it once was: tests build variants of it."""

    def read_text(self, encoding: str = "utf-8") -> str:
        return amalgamate()

    def read_bytes(self) -> bytes:
        return amalgamate().encode("utf-8")


SOURCE = _Source()


def cache_dir() -> Path:
    env = os.environ.get("BITLAB_FX_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitlab_fx"


def find_compiler(env: str, names: tuple, what: str) -> List[str]:
    """``$env`` (split like a shell would) or the first of ``names`` on the PATH."""
    given = os.environ.get(env)
    if given:
        return shlex.split(given)
    for name in names:
        path = shutil.which(name)
        if path:
            return [path]
    raise BuildError(f"no {what} compiler found (looked for ${env}, {', '.join(names)})")


def compiler() -> List[str]:
    return find_compiler("CC", ("cc", "gcc", "clang"), "C")


def cache_key(*parts: bytes) -> str:
    """16 hex digits naming a build of these inputs (source, compiler, flags, ...)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_cached(path: Path, make: Callable[[Path], None]) -> Path:
    """``path``, made by ``make(tmp)`` unless the cache has it: into a temporary file of the same directory,
    moved into place with ``os.replace`` (concurrent first uses all succeed)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}.so.tmp"
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    """The CPU's feature flags as the kernel lists them (x86 ``flags``, ARM64 ``Features``; empty where there is no
    ``/proc/cpuinfo``)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_features() -> str:
    """The CPU's SIMD features that matter to the kernel (part of the cache key)."""
    return platform.machine() + ":" + ",".join(sorted(f for f in cpu_flags() if f in _CPU_FLAGS))


def library_path(cc: List[str], openmp: bool = True, source: Optional[str] = None) -> Path:
    """Where the library for this source (default: :func:`amalgamate`'s), compiler, flags and CPU is cached."""
    src = (amalgamate() if source is None else source).encode("utf-8")
    key = cache_key(src, " ".join(cc).encode(), " ".join(CFLAGS).encode(), cpu_features().encode())
    return cache_dir() / f"bitlab_cpu-{key}.so"


def _run(cmds: List[List[str]]) -> None:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in cmds]
    errors = []
    for c, p in zip(cmds, procs):
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"`{' '.join(c)}` failed ({p.returncode}):\n{err.decode(errors='replace')[-2000:]}")
    if errors:
        raise BuildError("\n".join(errors))


def _torch_lib_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("torch")
    return Path(spec.origin).parent / "lib" if spec and spec.origin else None


def openmp_variants() -> List[Tuple[List[str], List[str]]]:
    """The (compile, link) flags for OpenMP that :func:`build` tries in order, before building without (one thread).

    ``-fopenmp`` (gcc, LLVM clang: the libgomp / libomp that torch has loaded). Apple clang has no ``-fopenmp``, so
    on macOS also ``-Xpreprocessor -fopenmp`` linked to the libomp torch ships (torch/lib/libomp.dylib: one OpenMP
    runtime for torch and the kernel), else to a Homebrew libomp (``$BITLAB_FX_LIBOMP``, /opt/homebrew/opt/libomp,
    /usr/local/opt/libomp); ``omp.h`` from that prefix when it has one (bitlab_cpu.h declares the two OpenMP
    functions it calls otherwise)."""
    variants = [(OPENMP, OPENMP)]
    if platform.system() == "Darwin":
        prefixes = [Path(p) for p in (os.environ.get("BITLAB_FX_LIBOMP"), "/opt/homebrew/opt/libomp",
                                      "/usr/local/opt/libomp") if p]
        headers = [f"-I{p / 'include'}" for p in prefixes if (p / "include" / "omp.h").exists()][:1]
        for lib in [_torch_lib_dir()] + [p / "lib" for p in prefixes]:
            if lib is not None and (lib / "libomp.dylib").exists():
                variants.append((["-Xpreprocessor", "-fopenmp"] + headers, [f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"]))
    return variants


def _compile(cc: List[str], out: Path, omp: Tuple[List[str], List[str]], source: str) -> None:
    """Compile ``source`` into the shared library ``out`` with OpenMP's (compile, link) flags ``omp``."""
    stem = str(out) + ".part"
    src = stem + ".c"
    objs = [f"{stem}{i}.o" for i in PARTS]
    try:
        with open(src, "w", encoding="utf-8") as f:
            f.write(source)
        _run([cc + CFLAGS + omp[0] + [f"-DBITLAB_PART={i}", "-c", src, "-o", o] for i, o in zip(PARTS, objs)])
        _run([cc + ["-shared"] + omp[1] + objs + ["-o", str(out), "-lm"]])
    finally:
        for o in [src] + objs:
            try:
                os.unlink(o)
            except OSError:
                pass


def build() -> Path:
    """Return the path of the compiled library, compiling it if the cache does not have it."""
    cc = compiler()
    source = amalgamate()

    def make(tmp: Path) -> None:
        try:
            for omp in openmp_variants():
                try:
                    _compile(cc, tmp, omp, source)
                    return
                except BuildError:
                    pass
            _compile(cc, tmp, ([], []), source)  # a compiler without OpenMP: single-threaded
        except FileNotFoundError as e:
            raise BuildError(f"C compiler {cc[0]!r} not found") from e

    return build_cached(library_path(cc, source=source), make)
