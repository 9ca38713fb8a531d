"""Triton kernels for ``bitlab.ternary_linear`` and ``bitlab.int8_linear``: the public entry points.

Kernels are launched on whatever device the tensors are on (CUDA, or CPU under ``TRITON_INTERPRET=1``,
which is how the tests run without a GPU). This module runs one op call: the one-time check of the
inline-assembly paths (:func:`self_check`), the choice of a tile config (fixed, or autotuned:
``_pick_config``) and the launches. The code lives by concern in the modules next to it, and every name
is re-exported here, so ``from bitlab_fx.ops.cuda import kernels as K`` reaches all of it:

* ``quant_act.py``: ``_quant_act_kernel``, int8 activations and their scales, exactly like the reference.
* ``linear.py``: ``_linear_kernel``, one ``[BLOCK_N, BLOCK_M]`` tile of ``y^T = W . xq^T`` per program;
  ``gemv.py``: its decode ``dp4a`` GEMV on 32-bit words; ``dot.py``: its run-by-run int8 ``tl.dot`` (or
  elementwise) path; ``epilogue.py``: ``y = float(acc) * ws[n] / s[m] + bias`` and the deterministic
  split-K reduction kernel.
* ``configs.py``: ``LinearConfig``, ``choose_config``, ``fit_config``, ``autotune_candidates``.
* ``launch.py``: the host launches; ``tuning.py``: the autotune cache and timer.

int8 weights run through the same kernels with ``PACKED=False`` (the runs are read straight from
``[N, K]``). ``act="none"`` runs them with float activations (fp32 products, IEEE ``tl.dot``).
``_pick_config`` looks ``autotune_candidates`` and ``_time_us`` up in this module, so tests can
monkeypatch them here.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import triton
from torch import Tensor

from ...quant.packing import pack_ternary, padded_k
from .. import reference
# the split modules' names, all re-exported: importers and tests reach them as ``kernels.<name>``
from .configs import (GEMV_MAX_M, LinearConfig, _num_sms, _sm_count, autotune_candidates,  # noqa: F401
                      choose_config, fit_config)
from .dot import _run_product, _runs_tile, _unpack_run  # noqa: F401
from .epilogue import (WS_CHANNEL, WS_GROUP, WS_TENSOR, _epilogue, _splitk_reduce_kernel,  # noqa: F401
                       _to_out_dtype)
from .gemv import _dp4a, _gemv_words  # noqa: F401
from .launch import (_ASM_OK, _asm_ok, _interpreted, _launch, _launch_linear, _ws_mode,  # noqa: F401
                     quantize_activations, supports, uses_words)
from .linear import _linear_kernel
from .quant_act import (MODE_FROM_AMAX, MODE_PER_TOKEN, MODE_ROW_AMAX, MODE_STATIC,  # noqa: F401
                        _quant_act_kernel, _round_half_even)
from .tuning import _TUNED, _may_benchmark, _time_us, clear_tuned_configs, tuned_configs  # noqa: F401


def self_check(device) -> bool:
    """Run the inline-assembly paths (``dp4a`` GEMV, SWAR unpacking before ``tl.dot``) against the portable
    Triton code on small random problems on ``device``; they must agree bit for bit. On a difference the
    assembly is switched off for that device (slower, still correct) with a warning. Runs once per device,
    on the first eager call of an op there (not inside a CUDA graph capture or a compile trace)."""
    key = str(torch.device(device))
    _ASM_OK[key] = True
    gen = torch.Generator().manual_seed(0)
    ok = True
    for m, cfg, packed, groups in ((1, LinearConfig(block_m=1, block_n=16, nb=2), True, 0),
                                   (5, LinearConfig(block_m=8, block_n=16, nb=1, split_k=2), False, 0),
                                   (3, LinearConfig(block_m=4, block_n=16, nb=1), True, 4),
                                   (20, LinearConfig(block_m=32, block_n=16, nb=2, use_dot=True), True, 0)):
        x = torch.randn(m, 256, generator=gen).to(device)
        wq = torch.randint(-1, 2, (24, 256), generator=gen, dtype=torch.int8)
        w = (pack_ternary(wq) if packed else torch.randint(-128, 128, (24, 256), generator=gen, dtype=torch.int8))
        ws = (torch.rand(24, groups, generator=gen) if groups else torch.rand(24, generator=gen)) + 0.1
        args = (x, w.to(device), ws.to(device), None, "per_token", None, packed, cfg)
        _ASM_OK[key] = True
        fast = _int_linear(*args)
        _ASM_OK[key] = False
        ok = ok and torch.equal(fast, _int_linear(*args))
    _ASM_OK[key] = ok
    if not ok:
        warnings.warn(f"bitlab_fx: the inline-assembly paths of the Triton kernels (dp4a, byte unpacking) gave "
                      f"results that differ from the portable code on {key} "
                      f"({torch.cuda.get_device_name(device) if key.startswith('cuda') else key}); they are "
                      "switched off there, so the ops stay correct but run slower. Please report this with "
                      "your GPU, driver and triton versions.", RuntimeWarning, stacklevel=2)
    return ok


def _ensure_self_check(x: Tensor) -> None:
    if x.device.type == "cuda" and str(x.device) not in _ASM_OK and _may_benchmark(x):
        self_check(x.device)


def _int_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], act: str,
                static_multiplier: Optional[Tensor], packed: bool, config: Optional[LinearConfig],
                bias_codes: Optional[Tensor] = None, act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    _ensure_self_check(x)
    k = x.shape[-1]
    n = weight.shape[0]
    if not supports(k, weight_scale):
        wq_fn = reference.ternary_linear if packed else reference.int8_linear
        return wq_fn(x, weight, weight_scale, bias, act, static_multiplier, bias_codes=bias_codes, act_bits=act_bits,
                     bias_bits=bias_bits)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    k_pad = padded_k(k)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    ws = weight_scale.to(torch.float32).contiguous()
    ws_mode = _ws_mode(ws)
    groups = ws.shape[1] if ws_mode == WS_GROUP else 1
    group_size = k // groups if ws_mode == WS_GROUP else 0
    act_float = act == "none"
    if act_float:
        xin, s, stride_xm = x2, ws, x2.stride(0)  # s unused
    else:
        xin, s = quantize_activations(x2, act, static_multiplier, k_pad, act_bits)
        stride_xm = k_pad
    launch = functools.partial(_launch_linear, xin=xin, weight=weight, ws=ws, s=s, bias=bias, m=m, n=n, k=k,
                               k_pad=k_pad, groups=groups, group_size=group_size, packed=packed, act_float=act_float,
                               ws_mode=ws_mode, stride_xm=stride_xm, bias_codes=bias_codes, bias_bits=bias_bits)
    if config is None:
        config = _pick_config(launch, x2, m, n, k_pad, group_size, (packed, act_float, ws_mode, x.dtype))
    else:
        config = fit_config(config, m, n, k_pad, group_size)
    launch(config, out)
    return out.reshape(*x.shape[:-1], n)


def _pick_config(launch, x2: Tensor, m: int, n: int, k_pad: int, group_size: int, kind: tuple) -> LinearConfig:
    """``choose_config``'s fixed pick, or with autotuning on (:func:`bitlab_fx.ops.cuda.set_autotune`) the
    fastest of :func:`autotune_candidates`, timed once per problem key on the call's own tensors. Calls that
    cannot time (CUDA graph capture, torch.compile tracing) use a tuned config when one is cached, else the
    fixed pick: they never benchmark, sync or allocate beyond the op's own buffers."""
    from . import autotune_enabled

    sms = _num_sms(x2.device)
    if not autotune_enabled():
        return choose_config(m, n, k_pad, group_size, sms)
    bucket = triton.next_power_of_2(max(m, 1)) if m <= 256 else 512 * -(-m // 512)
    key = (bucket, n, k_pad, group_size, *kind, str(x2.device))
    hit = _TUNED.get(key)
    if hit is not None:
        return fit_config(hit, m, n, k_pad, group_size)
    if not _may_benchmark(x2):
        return choose_config(m, n, k_pad, group_size, sms)
    scratch = torch.empty(m, n, dtype=kind[-1], device=x2.device)
    timed = []
    for cfg in autotune_candidates(m, n, k_pad, group_size, sms):
        try:
            launch(cfg, scratch)  # compile, and check that it launches, before timing
            timed.append((_time_us(lambda cfg=cfg: launch(cfg, scratch)), len(timed), cfg))
        except Exception:  # noqa: BLE001  (a config that does not compile or fit this GPU is skipped)
            continue
    best = min(timed)[2] if timed else choose_config(m, n, k_pad, group_size, sms)
    _TUNED[key] = best
    return best


def ternary_linear_triton(x: Tensor, packed_weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                          act: str = "per_token", static_multiplier: Optional[Tensor] = None,
                          config: Optional[LinearConfig] = None, bias_codes: Optional[Tensor] = None,
                          act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    """``bitlab.ternary_linear`` with the Triton kernels, on the tensors' device (no argument checks).

    ``config`` overrides the tile shape chosen by :func:`choose_config` (tests and benchmark sweeps);
    ``bias_codes``: an IntBias as int32 codes, added to the integer sums (the op's ``bias_codes=``);
    ``act_bits``, ``bias_bits``: the op's (activation codes of fewer bits; the float bias quantized per token).
    """
    return _int_linear(x, packed_weight, weight_scale, bias, act, static_multiplier, True, config, bias_codes,
                       act_bits, bias_bits)


def int8_linear_triton(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                       act: str = "per_token", static_multiplier: Optional[Tensor] = None,
                       config: Optional[LinearConfig] = None, bias_codes: Optional[Tensor] = None,
                       act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    """``bitlab.int8_linear`` with the Triton kernels (int8 weights ``[N, K]``)."""
    return _int_linear(x, weight, weight_scale, bias, act, static_multiplier, False, config, bias_codes, act_bits,
                       bias_bits)


KERNELS = [_quant_act_kernel, _linear_kernel, _splitk_reduce_kernel]
