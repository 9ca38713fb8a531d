"""Open a GGUF in llama-cpp-python the way that runs on every x86 CPU: ``bfx.load_llama_cpp(path, **kwargs)``.

llama.cpp's CPU backend moves Q4_0/Q4_1/Q8_0/K-quant weights into an AMX buffer ("extra buffer type") on CPUs with
AMX-INT8 (Intel Sapphire Rapids and later), and its AMX matmul crashes the process with a general protection fault
(llama.cpp issue #20824, open; seen with llama-cpp-python 0.3.36 on a 2-vCPU Sapphire Rapids guest, on bitlab_fx's
files and on the official SmolLM2 Q4_1 GGUF alike). On such CPUs this loader turns the extra buffer types off
(``llama_model_params.use_extra_bufts``); llama.cpp then computes those weights with its ordinary AVX-512 code,
the same numbers. Elsewhere the model is opened exactly as ``llama_cpp.Llama(path, **kwargs)`` would open it.
``BITLAB_FX_LLAMA_CPP_EXTRA_BUFTS=1`` keeps them on (a llama.cpp with the fix).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional

from ..errors import ExportError
from ..ops.cpu._build import cpu_flags

_KEEP = "BITLAB_FX_LLAMA_CPP_EXTRA_BUFTS"


def extra_buffers_crash(flags: Optional[Iterable[str]] = None) -> bool:
    """Whether llama.cpp's extra buffer types must stay off on this CPU: it has AMX-INT8 (llama.cpp's AMX matmul
    crashes, see the module docstring), unless ``BITLAB_FX_LLAMA_CPP_EXTRA_BUFTS=1`` says the llama.cpp is fixed."""
    if os.environ.get(_KEEP, "").strip() == "1":
        return False
    return "amx_int8" in (cpu_flags() if flags is None else set(flags))


@contextlib.contextmanager
def _model_params(llama_module, **overrides):
    """``llama_module.llama_model_default_params()`` returns its defaults with ``overrides`` set, inside the block
    (``llama_cpp.Llama`` reads the defaults while it loads the model and offers no argument for these fields)."""
    default = llama_module.llama_model_default_params

    def with_overrides():
        params = default()
        for name, value in overrides.items():
            setattr(params, name, value)
        return params

    llama_module.llama_model_default_params = with_overrides
    try:
        yield
    finally:
        llama_module.llama_model_default_params = default


def load_llama_cpp(path: str, **kwargs):
    """``llama_cpp.Llama(path, **kwargs)``, with llama.cpp's AMX weight buffers turned off on CPUs where they crash
    (:func:`extra_buffers_crash`). Needs ``pip install llama-cpp-python``."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as llama_module
    except ImportError as e:
        raise ExportError(f"bfx.load_llama_cpp({path!r}) needs llama-cpp-python: pip install llama-cpp-python "
                          "(built from source, ~10 minutes)") from e
    if not extra_buffers_crash():
        return llama_cpp.Llama(path, **kwargs)
    if not hasattr(llama_module.llama_model_params, "_fields_") or \
            "use_extra_bufts" not in dict(llama_module.llama_model_params._fields_):
        raise ExportError(f"bfx.load_llama_cpp({path!r}): this CPU has AMX-INT8, where llama.cpp's AMX matmul crashes, "
                          f"and llama-cpp-python {getattr(llama_cpp, '__version__', '?')} cannot turn it off "
                          "(no llama_model_params.use_extra_bufts); install a newer llama-cpp-python, or set "
                          f"{_KEEP}=1 if your llama.cpp has the fix")
    with _model_params(llama_module, use_extra_bufts=False):
        return llama_cpp.Llama(path, **kwargs)
