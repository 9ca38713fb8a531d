"""How the C kernel's files become one library (bitlab_fx/ops/cpu/_build.py): every file is compiled, and
the cache key covers every file. No compiler needed except where marked."""
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from bitlab_fx.ops import cpu

CPU_DIR = Path(cpu.__file__).parent


def _load_build(directory: Path):
    spec = importlib.util.spec_from_file_location("_build_copy", directory / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_files_lists_every_c_and_h_file_header_first():
    build = _load_build(CPU_DIR)
    listed = [name for name, _ in build.FILES]
    on_disk = sorted(p.name for p in CPU_DIR.iterdir() if p.suffix in (".c", ".h"))
    assert sorted(listed) == on_disk
    assert build.FILES[0] == ("bitlab_cpu.h", 0)
    assert {part for _, part in build.FILES[1:]} == set(build.PARTS)


def test_cache_key_changes_with_every_file(tmp_path):
    for p in CPU_DIR.iterdir():
        if p.suffix in (".c", ".h", ".py"):
            shutil.copy(p, tmp_path / p.name)
    build = _load_build(tmp_path)
    cc = ["cc"]
    key = build.library_path(cc).name
    for name, _ in build.FILES:
        path = tmp_path / name
        text = path.read_text()
        path.write_text(text + "/* edited */\n")
        assert build.library_path(cc).name != key, name
        path.write_text(text)
    assert build.library_path(cc).name == key


def test_amalgamation_names_each_file_and_keeps_its_lines():
    build = _load_build(CPU_DIR)
    text = build.amalgamate()
    lines = text.splitlines()
    for name, _ in build.FILES:
        own = (CPU_DIR / name).read_text().splitlines()
        start = lines.index(f'#line 1 "{name}"') + 1
        got = lines[start:start + len(own)]
        assert len(got) == len(own)
        for mine, theirs in zip(own, got):  # the same lines, local includes blanked
            assert theirs == mine or (theirs == "" and mine.startswith('#include "'))
    assert text.count("#if defined(__x86_64__) || defined(__i386__)") == 1  # the one switch, in the header


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_amalgamation_compiles_as_one_job(tmp_path):
    """No BITLAB_PART: the whole library in one translation unit (every file's job guard lets it in)."""
    build = _load_build(CPU_DIR)
    src = tmp_path / "all.c"
    src.write_text(build.amalgamate())
    res = subprocess.run(build.compiler() + build.CFLAGS + ["-fsyntax-only", str(src)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_openmp_on_macos_links_torchs_libomp_then_homebrews(tmp_path, monkeypatch):
    """Apple clang has no -fopenmp: on macOS the build also tries -Xpreprocessor -fopenmp linked to the libomp.dylib
    torch ships (one OpenMP runtime with torch), then to a Homebrew libomp (headers from its prefix); elsewhere
    only -fopenmp (then, in build(), no OpenMP)."""
    build = _load_build(CPU_DIR)
    torch_lib = tmp_path / "torch" / "lib"
    torch_lib.mkdir(parents=True)
    (torch_lib / "libomp.dylib").touch()
    brew = tmp_path / "libomp"
    for sub, name in (("include", "omp.h"), ("lib", "libomp.dylib")):
        (brew / sub).mkdir(parents=True)
        (brew / sub / name).touch()
    monkeypatch.setenv("BITLAB_FX_LIBOMP", str(brew))
    monkeypatch.setattr(build, "_torch_lib_dir", lambda: torch_lib)
    monkeypatch.setattr(build.platform, "system", lambda: "Darwin")
    apple = ["-Xpreprocessor", "-fopenmp", f"-I{brew / 'include'}"]
    assert build.openmp_variants()[:3] == [
        (["-fopenmp"], ["-fopenmp"]),
        (apple, [f"-L{torch_lib}", "-lomp", f"-Wl,-rpath,{torch_lib}"]),
        (apple, [f"-L{brew / 'lib'}", "-lomp", f"-Wl,-rpath,{brew / 'lib'}"]),
    ]
    monkeypatch.setattr(build.platform, "system", lambda: "Linux")
    assert build.openmp_variants() == [(["-fopenmp"], ["-fopenmp"])]


def test_the_cpu_flags_are_read_from_cpuinfo(tmp_path):
    """x86 lists ``flags``, ARM64 ``Features``; the other lines are not flags; no file: none."""
    from bitlab_fx.ops.cpu._build import cpu_flags
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni amx_int8 amx_tile\nbugs\t\t: spectre_v1\n")
    assert {"avx2", "amx_int8"} <= cpu_flags(str(info)) and "spectre_v1" not in cpu_flags(str(info))
    arm = tmp_path / "cpuinfo_arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n")
    assert cpu_flags(str(arm)) == {"fp", "asimd", "asimddp", "i8mm"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
