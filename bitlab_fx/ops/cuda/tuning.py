"""State and tools of the tile-config autotuner: the cache of tuned configs, the timer, and when timing is allowed.

``kernels._pick_config`` fills the cache (one entry per problem key, see :func:`tuned_configs`) by timing
``configs.autotune_candidates`` with :func:`_time_us`, only when :func:`_may_benchmark` says the call may
(not under fake tensors, tracing or CUDA graph capture; ``kernels.self_check`` uses the same gate).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .launch import _interpreted
from .linear import _linear_kernel

_TUNED: dict = {}  # problem key -> LinearConfig, filled by _pick_config


def _may_benchmark(x: Tensor) -> bool:
    """Timing needs real tensors and a stream that is not being captured into a CUDA graph."""
    from torch._subclasses import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(x, (FakeTensor, FunctionalTensor)) or torch._guards.detect_fake_mode() is not None:
        return False
    return x.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _time_us(fn) -> float:
    """Median microseconds of ``fn``: ``triton.testing.do_bench`` on a GPU, wall clock under the interpreter."""
    if torch.cuda.is_available() and torch.cuda.is_initialized() and not _interpreted(_linear_kernel):
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=20)
    import time

    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * sorted(ts)[1]


def tuned_configs() -> dict:
    """A copy of the autotune cache: ``{(M bucket, N, K_pad, group size, packed, act float, ws mode, dtype,
    device): LinearConfig}``."""
    return dict(_TUNED)


def clear_tuned_configs() -> None:
    _TUNED.clear()
