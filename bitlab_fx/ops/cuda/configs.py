"""Tile configs of the Triton linear kernel: the ``LinearConfig`` dataclass and how one is chosen on the host.

``choose_config`` picks a fixed tile shape by problem size (deterministic, CUDA-graph safe), ``fit_config``
makes any config valid for a problem (whole steps, steps inside one scale group, split-K), and
``autotune_candidates`` lists the few configs the autotuner times. Pure Python: no kernel is launched here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

from ...quant.packing import BLOCK


@dataclass(frozen=True)
class LinearConfig:
    """Tile shape of ``_linear_kernel``: ``BLOCK_M`` tokens x ``BLOCK_N`` outputs, ``NB`` 128-blocks of K per
    step, ``use_dot`` (int8 ``tl.dot``, needs ``BLOCK_M, BLOCK_N >= 16``) or the elementwise GEMV, and
    ``split_k`` K splits (1: the epilogue runs in the same kernel)."""
    block_m: int
    block_n: int
    nb: int = 2
    use_dot: bool = False
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


GEMV_MAX_M = 8  # up to this many tokens the elementwise GEMV beats an MMA padded to 16 rows


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # H100 SXM; only used to exercise the same heuristics under the interpreter


def choose_config(m: int, n: int, k_pad: int, group_size: int = 0, sms: int = 132) -> LinearConfig:
    """Fixed tile shapes by problem size (no autotuning: deterministic and CUDA-graph safe).

    Decode (``m <= 8``): elementwise GEMV with narrow N tiles and split-K until ~4 programs per SM.
    Prefill: int8 ``tl.dot``; wide tiles once M is large. Defaults picked for H100, to be tuned with
    ``benchmarks/bench_linear_cuda.py --sweep``.
    """
    if m <= GEMV_MAX_M:
        bm = triton.next_power_of_2(max(m, 1))
        cfg = LinearConfig(block_m=bm, block_n=64 if bm <= 2 else 32 if bm <= 4 else 16, nb=2, num_warps=4)
        target = 4 * sms
    elif m <= 64:
        cfg = LinearConfig(block_m=max(16, triton.next_power_of_2(m)), block_n=64, nb=2, use_dot=True, num_warps=4)
        target = 2 * sms
    elif m <= 128:
        cfg = LinearConfig(block_m=64, block_n=128, nb=1, use_dot=True, num_warps=4)
        target = sms
    else:
        cfg = LinearConfig(block_m=128, block_n=128, nb=1, use_dot=True, num_warps=8)
        target = sms
    return fit_config(cfg, m, n, k_pad, group_size, target)


def fit_config(cfg: LinearConfig, m: int, n: int, k_pad: int, group_size: int = 0,
               target_programs: int = 0) -> LinearConfig:
    """Make ``cfg`` valid for the problem: ``NB`` halved until ``K_pad`` is a whole number of steps and, with
    per-group scales, each step lies inside one group (at ``nb=1``, one group per 32-run); split K (powers
    of two, >= 4 steps each) until ``target_programs``; drop empty splits."""
    nb = cfg.nb
    while nb > 1 and ((group_size and group_size % (nb * BLOCK)) or k_pad % (nb * BLOCK)):
        nb //= 2  # each step inside one group, and K_pad a whole number of steps (no K masks)
    iters = max(1, -(-k_pad // (nb * BLOCK)))
    split = cfg.split_k
    if target_programs:
        tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
        while tiles * split < target_programs and iters // (split * 2) >= 4:
            split *= 2
    per_split = -(-iters // max(1, split))
    split = -(-iters // per_split)
    return replace(cfg, nb=nb, split_k=split)


def autotune_candidates(m: int, n: int, k_pad: int, group_size: int = 0, sms: int = 132) -> list[LinearConfig]:
    """The small space the autotuner (``_pick_config``) times: ``choose_config``'s pick first, then a few neighbours
    (narrower/wider N tiles, more K per step, more or fewer K splits, narrow tiles with no split and so no
    reduction launch; for the MMA path also other ``BLOCK_M``, ``num_warps`` and ``num_stages``). At most 10
    configs, duplicates removed after fitting."""
    base = choose_config(m, n, k_pad, group_size, sms)
    bm = base.block_m
    if not base.use_dot:
        raw = [(LinearConfig(block_m=bm, block_n=bn, nb=nb, num_warps=w), t)
               for bn, nb, w, t in ((base.block_n // 2, 2, 4, 4), (base.block_n * 2, 2, 4, 4), (base.block_n, 4, 4, 4),
                                    (base.block_n, 2, 4, 8), (base.block_n, 2, 4, 2), (base.block_n, 2, 8, 4),
                                    (base.block_n * 2, 4, 8, 2), (16, 2, 4, 0), (32, 4, 4, 0))]  # 0: no split-K
    else:
        raw = [(replace(base, block_n=128 if base.block_n == 64 else 64), 2), (replace(base, num_stages=4), 2),
               (replace(base, num_warps=8 if base.num_warps == 4 else 4), 2),
               (replace(base, nb=2 if base.nb == 1 else 1), 2),
               (replace(base, split_k=1), 0), (replace(base, block_m=max(16, bm // 2)), 2),
               (replace(base, block_m=min(128, bm * 2), block_n=128, num_warps=8), 1)]
    out = [base]
    for cfg, t in raw:
        if cfg.block_n < 8:
            continue
        cfg = fit_config(replace(cfg, split_k=1), m, n, k_pad, group_size, t * sms)
        if cfg not in out:
            out.append(cfg)
    return out[:10]
