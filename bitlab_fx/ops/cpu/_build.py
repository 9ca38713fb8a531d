"""Build ``bitlab_cpu.c`` with the system C compiler into a per-user cache, once per source/flags/CPU.

The library is compiled on first use (never at ``import bitlab_fx``) into
``$BITLAB_FX_CACHE_DIR`` or ``$XDG_CACHE_HOME/bitlab_fx`` or ``~/.cache/bitlab_fx``, under a name
keyed by the source hash, the compiler, the flags and the CPU features. Two halves of the source
compile in parallel (``-DBITLAB_PART=1/2``), then link. Output goes to a temporary file in the same
directory and is moved into place with ``os.replace``, so concurrent first uses all succeed.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import List

SOURCE = Path(__file__).with_name("bitlab_cpu.c")
# -ffp-contract=off: no FMA contraction, so the fp32 rescale rounds exactly like reference.py.
# -fno-tree-vectorize: the hot loops are written with intrinsics; gcc's auto-vectoriser only added
# compile time (~15% of the first-use build, which targets ~2 s on 2 cores) and no measurable speed.
CFLAGS = ["-O3", "-fno-tree-vectorize", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-std=gnu11"]
OPENMP = ["-fopenmp"]
_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "neon", "asimd")


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    env = os.environ.get("BITLAB_FX_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitlab_fx"


def compiler() -> List[str]:
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise BuildError("no C compiler found (looked for $CC, cc, gcc, clang)")


def cpu_features() -> str:
    """The CPU's SIMD features that matter to the kernel (part of the cache key)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return platform.machine() + ":" + ",".join(sorted(f for f in flags if f in _CPU_FLAGS))


def library_path(cc: List[str], openmp: bool = True) -> Path:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(cc).encode(), " ".join(CFLAGS).encode(), cpu_features().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"bitlab_cpu-{h.hexdigest()[:16]}.so"


def _run(cmds: List[List[str]]) -> None:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in cmds]
    errors = []
    for c, p in zip(cmds, procs):
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"`{' '.join(c)}` failed ({p.returncode}):\n{err.decode(errors='replace')[-2000:]}")
    if errors:
        raise BuildError("\n".join(errors))


def _compile(cc: List[str], out: Path, openmp: bool) -> None:
    omp = OPENMP if openmp else []
    stem = str(out) + ".part"
    objs = [f"{stem}{i}.o" for i in (1, 2)]
    try:
        _run([cc + CFLAGS + omp + [f"-DBITLAB_PART={i}", "-c", str(SOURCE), "-o", o] for i, o in zip((1, 2), objs)])
        _run([cc + ["-shared"] + omp + objs + ["-o", str(out), "-lm"]])
    finally:
        for o in objs:
            try:
                os.unlink(o)
            except OSError:
                pass


def build() -> Path:
    """Return the path of the compiled library, compiling it if the cache does not have it."""
    try:
        cc = compiler()
    except BuildError:
        raise
    path = library_path(cc)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}.so.tmp"
    try:
        try:
            _compile(cc, tmp, openmp=True)
        except FileNotFoundError as e:
            raise BuildError(f"C compiler {cc[0]!r} not found") from e
        except BuildError:
            _compile(cc, tmp, openmp=False)  # e.g. a compiler without OpenMP: single-threaded kernel
        os.replace(tmp, path)
    except FileNotFoundError as e:
        raise BuildError(f"C compiler {cc[0]!r} not found") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
