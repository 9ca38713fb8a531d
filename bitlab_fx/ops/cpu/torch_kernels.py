"""C++ dispatcher kernels for the CPU linear ops (``torch_kernels.cpp``): built and loaded with the C kernel.

Behind torch's dispatcher a Python kernel costs ~11 us per call in argument boxing alone, more than a decode
step's C kernel on a small layer; compiled graphs and direct ``torch.ops.bitlab`` calls pay it on every call.
:func:`install` (run by ``cpu._load`` once the C library is loaded, i.e. at the first CPU op call) compiles
``torch_kernels.cpp`` against the installed torch with the system C++ compiler (~7 s, cached like the C
library), replaces the Python CPU kernels of ``ternary_linear``/``int8_linear``/``int4_linear`` with it, and
hands it the C library's ``bitlab_linear``. The Python kernels stay reachable as ``bitlab::_py_<op>``: the C++
kernel runs the common case itself and passes every other call to them, so results never differ.

Where the C++ build fails (no ``c++``/``g++``, no torch headers) the Python kernels simply stay.
``BITLAB_FX_TORCH_KERNELS=0`` keeps them on purpose.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from . import _build

SOURCE = Path(__file__).with_name("torch_kernels.cpp")
LINEAR_OPS = ("ternary_linear", "int8_linear", "int4_linear")
_state: Dict[str, object] = {"installed": False, "error": None}


def define_python_fallbacks(python_kernels: Dict[str, Callable]) -> torch.library.Library:
    """Define ``bitlab::_py_<op>`` (the schema of ``<op>``) with the Python CPU kernel, for the C++ kernel to call."""
    lib = torch.library.Library("bitlab", "FRAGMENT")
    for name in LINEAR_OPS:
        schema = str(getattr(torch.ops.bitlab, name).default._schema).split("::", 1)[1]
        lib.define("_py_" + schema)
        lib.impl("_py_" + name, python_kernels[name], "CPU")
    return lib


def _command(cxx: List[str], out: Path) -> List[str]:
    from torch.utils import cpp_extension

    lib_dir = cpp_extension.library_paths()[0]
    return (cxx + ["-shared", "-fPIC", "-O2", "-std=c++17", "-w",
                   f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
            + [f"-I{p}" for p in cpp_extension.include_paths()]
            + [str(SOURCE), f"-L{lib_dir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib_dir}", "-o", str(out)])


def build() -> Path:
    """The compiled kernels' path (compiled now unless cached for this source, compiler and torch)."""
    cxx = _build.find_compiler("CXX", ("c++", "g++", "clang++"), "C++")
    key = _build.cache_key(SOURCE.read_bytes(), " ".join(cxx).encode(), torch.__version__.encode(),
                           os.path.dirname(torch.__file__).encode())

    def make(tmp: Path) -> None:
        proc = subprocess.run(_command(cxx, tmp), capture_output=True, text=True)
        if proc.returncode != 0:
            raise _build.BuildError(f"C++ kernels failed to compile ({proc.returncode}): {proc.stderr[-1500:]}")

    return _build.build_cached(_build.cache_dir() / f"bitlab_torch-{key}.so", make)


def install(c_library, python_lib: torch.library.Library,
            register_python: Callable[[], torch.library.Library]) -> Optional[torch.library.Library]:
    """Build and load the C++ kernels in place of the Python ones of :data:`LINEAR_OPS` (registered in
    ``python_lib``). Returns the library now holding the Python kernels: ``python_lib`` if the C++ kernels could
    not be installed (:data:`status` says why), None once they are."""
    if _state["installed"]:
        return None
    if os.environ.get("BITLAB_FX_TORCH_KERNELS", "1") == "0":
        _state["error"] = "switched off by BITLAB_FX_TORCH_KERNELS=0"
        return python_lib
    try:
        path = build()
    except Exception as e:  # noqa: BLE001  (no C++ compiler, no headers: keep the Python kernels)
        _state["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        return python_lib
    python_lib._destroy()  # frees the dispatcher's CPU slot of each linear op; loading registers the C++ kernels
    try:
        torch.ops.load_library(str(path))
        linear = ctypes.cast(c_library.bitlab_linear, ctypes.c_void_p).value
        ctypes.CDLL(str(path)).bitlab_torch_set_kernel(ctypes.c_void_p(linear))
    except Exception as e:  # noqa: BLE001  (unloadable: the Python kernels again)
        _state["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        return register_python()
    _state["installed"] = True
    return None


def status() -> str:
    """"C++" when the C++ kernels run the CPU linear ops, else why the Python kernels do."""
    return "C++" if _state["installed"] else f"Python ({_state['error'] or 'not tried yet: no CPU op has run'})"


def installed() -> bool:
    """Whether the C++ kernels run the CPU linear ops in this process."""
    return bool(_state["installed"])
