"""``retain_freed_memory``: keep glibc from handing big freed blocks back to the system between training steps.

A QAT step on CPU allocates many large temporaries (weight-sized codes and dequantized weights, logits-sized loss
terms) and frees them before the next step. With glibc's defaults a block of more than 32 MB is always its own
``mmap`` and smaller ones return to the system once the heap's free top exceeds the trim threshold, so each step
maps them in again and pays a page fault per 4 KB page: on SmolLM2-135M's distillation step ~0.6 s of 2.05 s
(ternary, eager; ``benchmarks/bench_distill_step.py``, docs/qat-llm.md). After this call the freed memory stays
in the process for the next step: resident memory stays near the peak of a step instead of falling between steps.
The same as starting Python with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` set.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2 ** 31 - 1


def _glibc():
    """The C library when it is glibc (mallopt and its parameters are glibc's), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory(mmap_threshold_mb: int = 1024, top_pad_mb: int = 256) -> bool:
    """Make glibc serve blocks below ``mmap_threshold_mb`` from its heap and keep freed heap memory (trim threshold
    at its maximum, ``top_pad_mb`` extra each time the heap grows). Returns True when applied, False where the C
    library is not glibc (nothing changes there). Process-wide and not undone: call it once, before training."""
    if not (1 <= mmap_threshold_mb <= 2047 and 0 <= top_pad_mb <= 2047):
        from ..errors import ConfigError
        raise ConfigError(f"retain_freed_memory(mmap_threshold_mb={mmap_threshold_mb}, top_pad_mb={top_pad_mb}): "
                          "each must be below 2048 (mallopt takes a C int of bytes)")
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, mmap_threshold_mb << 20), (_M_TRIM_THRESHOLD, _INT_MAX),
                (_M_TOP_PAD, top_pad_mb << 20))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
