"""The QAT step's quantizers on the C kernel (``train_quant.c``): one pass per tensor, int8 codes out.

:func:`weight_codes_s8` and :func:`activation_codes_s8` give bitwise what ``quant/primitives.py`` computes with torch
ops (``clamp(round(w / step), -q, q)``; the multiplier ``qmax / max(max|x|, EPS)`` per row and
``clamp(round(x * mult), -128, 127)``), as int8 tensors, without the fp32 temporaries and the five to eight
passes of the torch expressions. They return None where they do not apply (kernel not built or disabled, not a
contiguous fp32 CPU tensor, a tensor subclass such as a DTensor, under torch.compile); the caller then computes
the same numbers with torch.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import kernel_library


def _fits(t: Tensor) -> bool:
    """A plain contiguous fp32 CPU tensor outside torch.compile (not a subclass: a DTensor's data_ptr is not its
    values)."""
    return (not torch.compiler.is_compiling() and type(t) is torch.Tensor and t.device.type == "cpu"
            and t.dtype == torch.float32 and t.is_contiguous() and t.numel() > 0 and not t.requires_grad)


def weight_codes_s8(groups: Tensor, steps: Tensor, qmax: int) -> Optional[Tensor]:
    """int8 codes of a weight viewed as ``groups [rows..., n]`` (each row one step: ``steps`` holds one per row, any
    shape with that many numbers) with ``|code| <= qmax <= 127``; None where the kernel does not apply."""
    lib = kernel_library() if _fits(groups) else None
    if lib is None or not 1 <= qmax <= 127:
        return None
    n = groups.shape[-1]
    rows = groups.numel() // n
    steps = steps.detach().float().contiguous()
    if steps.numel() != rows or type(steps) is not torch.Tensor:
        return None
    codes = torch.empty(groups.shape, dtype=torch.int8)
    lib.bitlab_weight_codes_s8(groups.data_ptr(), rows, n, steps.data_ptr(), int(qmax), codes.data_ptr(),
                               torch.get_num_threads())
    return codes


def activation_codes_s8(x: Tensor, token_dims: Optional[int], qmax: int) -> Optional[Tuple[Tensor, Tensor]]:
    """``(int8 codes, fp32 multipliers)`` of a dynamic signed quantizer on ``x``: one multiplier per token (the last
    ``token_dims`` dims; shaped ``x.shape[:-token_dims] + (1,) * token_dims``), or for the whole tensor
    (``token_dims=None``: shape ``()``); None where the kernel does not apply."""
    lib = kernel_library() if _fits(x) else None
    if lib is None or not 1 <= qmax <= 127:
        return None
    if token_dims is None:
        rows, mult_shape = 1, ()
    else:
        rows = math.prod(x.shape[:-token_dims])
        mult_shape = tuple(x.shape[:-token_dims]) + (1,) * token_dims
    codes = torch.empty(x.shape, dtype=torch.int8)
    mult = torch.empty(mult_shape, dtype=torch.float32)
    lib.bitlab_act_codes_s8(x.data_ptr(), rows, x.numel() // rows, int(qmax), mult.data_ptr(), codes.data_ptr(),
                            torch.get_num_threads())
    return codes, mult
