"""The QAT step's quantizers on the C kernel (``train_quant.c``): one pass per tensor, int8 codes out.

:func:`weight_codes_s8` and :func:`activation_codes_s8` give bitwise what ``quant/primitives.py`` computes with torch
ops (``clamp(round(w / step), -q, q)``; the multiplier ``qmax / max(max|x|, EPS)`` per row and
``clamp(round(x * mult), -128, 127)``), as int8 tensors, without the fp32 temporaries and the five to eight
passes of the torch expressions. They return None where they do not apply (kernel not built or disabled, not an
fp32 CPU tensor, a tensor subclass such as a DTensor); the caller then computes the same numbers with torch.

Both run as ops (``torch.ops.bitlab.weight_codes_s8`` / ``act_codes_s8``), opaque to torch.compile: inductor then
calls the one-pass kernels too, and keeps their int8 outputs for the backward rather than recomputing them there.
:func:`dequantize_s8` (``torch.ops.bitlab.dequant_s8``, eager mode) gives the backward the float values of int8 codes
in one pass, bitwise ``codes.to(torch.float32).mul_(scale)`` / ``.div_(scale)``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import kernel_library, kernel_loaded

_LIB = torch.library.Library("bitlab", "FRAGMENT")
_LIB.define("weight_codes_s8(Tensor groups, Tensor steps, int qmax) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
_LIB.define("act_codes_s8(Tensor x, int rows, int qmax) -> (Tensor, Tensor)", tags=(torch.Tag.pt2_compliant_tag,))
_LIB.define("dequant_s8(Tensor codes, Tensor scale, bool divide) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))


def _weight_codes_impl(groups: Tensor, steps: Tensor, qmax: int) -> Tensor:
    groups, steps = groups.contiguous(), steps.contiguous()
    n = groups.shape[-1]
    lib = kernel_library()
    if lib is None:  # disabled after a torch.compile trace took the op: the same numbers from the torch expression
        from ...quant import arithmetic as A
        rows = groups.reshape(-1, n)
        return A.weight_codes(rows, steps.reshape(-1, 1), qmax).to(torch.int8).reshape(groups.shape)
    codes = torch.empty(groups.shape, dtype=torch.int8)
    lib.bitlab_weight_codes_s8(groups.data_ptr(), groups.numel() // n, n, steps.data_ptr(), qmax,
                                            codes.data_ptr(), torch.get_num_threads())
    return codes


def _act_codes_impl(x: Tensor, rows: int, qmax: int) -> Tuple[Tensor, Tensor]:
    x = x.contiguous()
    lib = kernel_library()
    if lib is None:  # as in _weight_codes_impl
        from ...quant import arithmetic as A
        flat = x.reshape(rows, -1)
        mult = A.multiplier(flat.abs().amax(-1, keepdim=True), qmax)
        return A.codes(flat, mult, -qmax - 1, qmax).to(torch.int8).reshape(x.shape), mult.reshape(rows)
    codes = torch.empty(x.shape, dtype=torch.int8)
    mult = torch.empty(rows, dtype=torch.float32)
    lib.bitlab_act_codes_s8(x.data_ptr(), rows, x.numel() // rows, qmax, mult.data_ptr(),
                                         codes.data_ptr(), torch.get_num_threads())
    return codes, mult


def _dequant_impl(codes: Tensor, scale: Tensor, divide: bool) -> Tensor:
    codes, scale = codes.contiguous(), scale.contiguous()
    rows = scale.numel()
    lib = kernel_library()
    if lib is None:  # as in _weight_codes_impl
        flat = codes.reshape(rows, -1).to(torch.float32)
        return (flat.div_(scale.reshape(rows, 1)) if divide else flat.mul_(scale.reshape(rows, 1))).reshape(codes.shape)
    out = torch.empty(codes.shape, dtype=torch.float32)
    lib.bitlab_dequant_s8(codes.data_ptr(), rows, codes.numel() // rows, scale.data_ptr(), int(divide), out.data_ptr(),
                          torch.get_num_threads())
    return out


_LIB.impl("weight_codes_s8", _weight_codes_impl, "CPU")
_LIB.impl("dequant_s8", _dequant_impl, "CPU")
torch.library.register_fake("bitlab::dequant_s8", lambda codes, scale, divide: codes.new_empty(
    codes.shape, dtype=torch.float32), lib=_LIB)
_LIB.impl("act_codes_s8", _act_codes_impl, "CPU")
torch.library.register_fake("bitlab::weight_codes_s8",
                            lambda groups, steps, qmax: groups.new_empty(groups.shape, dtype=torch.int8), lib=_LIB)
torch.library.register_fake("bitlab::act_codes_s8", lambda x, rows, qmax: (
    x.new_empty(x.shape, dtype=torch.int8), x.new_empty((rows,), dtype=torch.float32)), lib=_LIB)


def _kernel_built() -> bool:
    """Whether the C kernel is there; under torch.compile, whether it is loaded already (the trace cannot enter the
    loader's lock; ``bfx.compile`` loads it first), else the torch expressions are traced."""
    return kernel_loaded() if torch.compiler.is_compiling() else kernel_library() is not None


def _fits(t: Tensor) -> bool:
    """A plain fp32 CPU tensor (not a subclass: a DTensor's data_ptr is not its values) with no gradient, and the
    kernel built."""
    plain = type(t) is torch.Tensor or torch.compiler.is_compiling()  # traced: FakeTensors / FunctionalTensors
    return (plain and t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0
            and not t.requires_grad and _kernel_built())


def weight_codes_s8(groups: Tensor, steps: Tensor, qmax: int) -> Optional[Tensor]:
    """int8 codes of a weight viewed as ``groups [rows..., n]`` (each row one step: ``steps`` holds one per row, any
    shape with that many numbers) with ``|code| <= qmax <= 127``; None where the kernel does not apply."""
    if not (_fits(groups) and 1 <= qmax <= 127):
        return None
    rows = groups.numel() // groups.shape[-1]
    steps = steps.detach().float()
    if steps.numel() != rows or not (type(steps) is torch.Tensor or torch.compiler.is_compiling()):
        return None
    return torch.ops.bitlab.weight_codes_s8(groups, steps.reshape(rows), int(qmax))


def activation_codes_s8(x: Tensor, token_dims: Optional[int], qmax: int) -> Optional[Tuple[Tensor, Tensor]]:
    """``(int8 codes, fp32 multipliers)`` of a dynamic signed quantizer on ``x``: one multiplier per token (the last
    ``token_dims`` dims; shaped ``x.shape[:-token_dims] + (1,) * token_dims``), or for the whole tensor
    (``token_dims=None``: shape ``()``); None where the kernel does not apply."""
    if not (_fits(x) and 1 <= qmax <= 127):
        return None
    if token_dims is None:
        rows, mult_shape = 1, ()
    else:
        rows = math.prod(x.shape[:-token_dims])
        mult_shape = tuple(x.shape[:-token_dims]) + (1,) * token_dims
    codes, mult = torch.ops.bitlab.act_codes_s8(x, rows, int(qmax))
    return codes, mult.reshape(mult_shape)


def dequantize_s8(codes: Tensor, scale: Tensor, divide: bool) -> Optional[Tensor]:
    """fp32 ``codes * scale`` (``divide``: ``codes / scale``) of int8 codes in one pass, bitwise torch's
    ``codes.to(torch.float32).mul_(scale)`` / ``.div_(scale)``, where ``scale`` holds one number per row of ``codes``
    (``codes`` viewed as ``[scale.numel(), -1]``: a per-token multiplier shaped ``[M, 1]`` or ``[B, 1, 1, 1]``, a
    weight's steps in its groups' order, or one number); None where the kernel does not apply (then the caller uses
    torch). Eager mode only: under torch.compile inductor fuses the same two operations into its kernels."""
    if torch.compiler.is_compiling() or not (type(codes) is torch.Tensor and type(scale) is torch.Tensor):
        return None
    if not (codes.dtype == torch.int8 and scale.dtype == torch.float32 and codes.device.type == "cpu"
            and scale.device.type == "cpu" and codes.numel() > 0 and not codes.requires_grad
            and not scale.requires_grad and codes.numel() % max(scale.numel(), 1) == 0 and _kernel_built()):
        return None
    return torch.ops.bitlab.dequant_s8(codes, scale.reshape(-1), bool(divide))
