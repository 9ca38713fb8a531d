"""Pure-PyTorch implementations of the bitlab ops: the oracle every kernel is tested against.

Device-agnostic and deliberately simple. Integer dot products are exact and rescaled in fp32 in a
fixed order, by the shared arithmetic of :mod:`bitlab_fx.quant.arithmetic`::

    y[m, n] = float(acc[m, n]) * weight_scale[n] / s[m]        (+ bias[n])
    y[m, n] = sum_g(float(acc[m, n, g]) * weight_scale[n, g]) / s[m]   (per-group)

where ``s`` is the activation multiplier (``xq = clamp(round(x * s), -128, 127)``,
``s = 127 / max(|x|)`` per token or per tensor, or the static ``static_multiplier``). With ``act_bits`` below 8
the codes are that many bits (``qmax = 2**(act_bits-1) - 1``: ``s = qmax / max|x|``, clamped to
``[-qmax - 1, qmax]``). ``bias_bits`` quantizes the float bias per token on that token's step
``weight_scale / s[m]`` (an IntBias on a dynamic multiplier, :func:`~bitlab_fx.quant.arithmetic.token_bias_codes`)
and adds the codes to the integer sums.
"""
from __future__ import annotations

import math

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..quant import arithmetic as A
from ..quant.packing import unpack_int4, unpack_ternary

ACT_MODES = ("per_token", "per_tensor", "none")


def act_qmax(act_bits: int) -> int:
    """The largest signed activation code of ``act_bits`` bits (127 for int8)."""
    return 2 ** (act_bits - 1) - 1


def act_multiplier(x2: torch.Tensor, act: str, static_multiplier: Optional[torch.Tensor], token_dims: int = 1,
                   act_bits: int = 8) -> torch.Tensor:
    """``s`` for an fp32 input, shaped to broadcast: ``[M, 1...]`` per token, ``[1...]`` otherwise."""
    bshape = (1,) * x2.dim()
    qmax = act_qmax(act_bits)
    if static_multiplier is not None:
        return static_multiplier.float().reshape(bshape)
    if x2.numel() == 0:
        return x2.new_full(bshape, qmax / A.EPS)
    if act == "per_token":
        dims = tuple(range(x2.dim() - token_dims, x2.dim()))
        amax = x2.abs().amax(dim=dims, keepdim=True)
    else:
        amax = x2.abs().amax().reshape(bshape)
    return A.multiplier(amax, qmax)


def quantize_int8(x2: torch.Tensor, s: torch.Tensor, act_bits: int = 8) -> torch.Tensor:
    """The op's activation codes: int8 codes, or ``act_bits``-bit signed codes (fp32 whole numbers)."""
    qmax = act_qmax(act_bits)
    return A.codes(x2, s, -qmax - 1, qmax)


def int_biases(bias: Optional[torch.Tensor], bias_codes: Optional[torch.Tensor], bias_bits: int,
               weight_scale: torch.Tensor, s: torch.Tensor):
    """``(float bias, integer bias codes)`` of a call: ``bias_bits`` turns the float bias into codes per token
    (``[T, N]`` on the steps ``weight_scale / s[t]``); stored ``bias_codes [N]`` pass as they are."""
    if bias_bits and bias is not None:
        return None, A.token_bias_codes(bias, weight_scale, s, bias_bits)
    return bias, bias_codes


def int_linear(x: torch.Tensor, wq: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
               act: str, static_multiplier: Optional[torch.Tensor], max_abs_w: int = 127,
               bias_codes: Optional[torch.Tensor] = None, act_bits: int = 8, bias_bits: int = 0) -> torch.Tensor:
    """``y = x @ (wq * weight_scale).T + bias`` with ``x`` quantized to int8 (``act``) and ``wq`` integer;
    ``bias_codes`` (int32, an IntBias on the step ``weight_scale / static_multiplier``) join the integer sums, as
    do the per-token codes of the float bias with ``bias_bits``."""
    k = x.shape[-1]
    n = wq.shape[0]
    x2 = x.reshape(-1, k).float()
    ws = weight_scale.float()
    if act == "none":
        if ws.dim() == 2:
            w = (wq.float().reshape(n, ws.shape[1], -1) * ws.unsqueeze(-1)).reshape(n, k)
        else:
            w = wq.float() * ws.reshape(-1, 1)
        y = A.add_bias(x2 @ w.t(), bias, -1, x.dtype)
    else:
        s = act_multiplier(x2, act, static_multiplier, act_bits=act_bits)
        bias, bias_codes = int_biases(bias, bias_codes, bias_bits, ws, s)
        y = A.linear_from_codes(quantize_int8(x2, s, act_bits), s, wq, ws, bias, x.dtype, max_abs_w, bias_codes)
    return y.reshape(*x.shape[:-1], n)


def ternary_linear(x, packed_weight, weight_scale, bias=None, act="per_token", static_multiplier=None, in_features=-1,
                   bias_codes=None, act_bits=8, bias_bits=0):
    return int_linear(x, unpack_ternary(packed_weight, x.shape[-1]), weight_scale, bias, act, static_multiplier, 1,
                      bias_codes, act_bits, bias_bits)


def int8_linear(x, weight, weight_scale, bias=None, act="per_token", static_multiplier=None, bias_codes=None,
                act_bits=8, bias_bits=0):
    return int_linear(x, weight, weight_scale, bias, act, static_multiplier, 127, bias_codes, act_bits, bias_bits)


def int_conv2d(x: torch.Tensor, wq: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
               stride: List[int], padding: List[int], dilation: List[int], groups: int,
               act: str, static_multiplier: Optional[torch.Tensor], max_abs_w: int = 127,
               bias_codes: Optional[torch.Tensor] = None, act_bits: int = 8, bias_bits: int = 0) -> torch.Tensor:
    """conv2d with integer weights ``wq [Cout, Cin/groups, kh, kw]``; ``act="per_token"`` means one scale per sample
    (so with ``bias_bits`` the bias codes are per sample ``[B, Cout]``, on the step ``weight_scale / s[b]``)."""
    xf = x.float()
    if act == "none":
        ws = weight_scale.float().reshape(-1, 1, 1, 1)
        y = F.conv2d(xf, wq.float() * ws, None, stride, padding, dilation, groups)
        return A.add_bias(y, bias, 1, x.dtype)
    s = act_multiplier(xf, act, static_multiplier, token_dims=3, act_bits=act_bits)
    bias, bias_codes = int_biases(bias, bias_codes, bias_bits, weight_scale, s)
    return A.conv_from_codes(quantize_int8(xf, s, act_bits), s, wq, weight_scale, bias, stride, padding, dilation,
                             groups, x.dtype, max_abs_w, bias_codes)


def unpack_conv_weight(unpack, packed_weight: torch.Tensor, weight_shape: List[int]) -> torch.Tensor:
    """A packed ``[Cout, K_packed]`` conv weight back to int8 ``weight_shape`` (``unpack``: ternary or int4)."""
    return unpack(packed_weight, math.prod(weight_shape[1:])).reshape(list(weight_shape))


def ternary_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups,
                   act="per_token", static_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    wq = unpack_conv_weight(unpack_ternary, packed_weight, weight_shape)
    return int_conv2d(x, wq, weight_scale, bias, stride, padding, dilation, groups, act, static_multiplier, 1,
                      bias_codes, act_bits, bias_bits)


def int8_conv2d(x, weight, weight_scale, bias, stride, padding, dilation, groups, act="per_token", static_multiplier=None,
                bias_codes=None, act_bits=8, bias_bits=0):
    return int_conv2d(x, weight, weight_scale, bias, stride, padding, dilation, groups, act, static_multiplier, 127,
                      bias_codes, act_bits, bias_bits)


def int4_linear(x, packed_weight, weight_scale, bias=None, act="per_token", static_multiplier=None, in_features=-1,
                bias_codes=None, act_bits=8, bias_bits=0):
    """``int_linear`` with weights of 2..4 bits packed two per byte (:func:`~bitlab_fx.quant.packing.pack_int4`)."""
    return int_linear(x, unpack_int4(packed_weight, x.shape[-1]), weight_scale, bias, act, static_multiplier, 8,
                      bias_codes, act_bits, bias_bits)


def int4_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups,
                act="per_token", static_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    wq = unpack_conv_weight(unpack_int4, packed_weight, weight_shape)
    return int_conv2d(x, wq, weight_scale, bias, stride, padding, dilation, groups, act, static_multiplier, 8,
                      bias_codes, act_bits, bias_bits)


def quantize_dequantize(x: torch.Tensor, multiplier: Optional[torch.Tensor], bits: int, signed: bool,
                        granularity: str = "per_tensor", token_dims: int = 1) -> torch.Tensor:
    """``clamp(round(x * s), qmin, qmax) / s`` in ``x``'s dtype: the converted form of an activation
    fake quantizer. ``multiplier`` is the static ``s``; None computes it from ``x`` (``granularity``)."""
    from ..config import IntActivation
    from ..quant import primitives as P

    spec = IntActivation(bits=bits, signed=signed, granularity=granularity, dynamic=multiplier is None)
    s = P.activation_multiplier(x, spec, token_dims) if multiplier is None else multiplier.float()
    return P.dequantize_activation(P.quantize_activation(x, s, spec), s, x.dtype)


_UNPACK = {"ternary": (unpack_ternary, 1), "int4": (unpack_int4, 8), "int8": (None, 127)}  # codes, max |code|


def grouped_linear(fmt: str, x: torch.Tensor, group_ends: List[int], weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: Optional[torch.Tensor], act: str, static_multiplier: Optional[torch.Tensor]) -> torch.Tensor:
    """The grouped-expert ops (``bitlab.<format>_grouped_linear``, :mod:`bitlab_fx.ops._grouped`): each expert
    ``e``'s rows ``x[group_ends[e-1]:group_ends[e]]`` through :func:`int_linear` with its weight ``weight[e]``
    (format ``fmt``) and steps ``weight_scale[e]``."""
    unpack, max_abs_w = _UNPACK[fmt]
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, end in enumerate(group_ends):
        if end > start:
            wq = weight[e] if unpack is None else unpack(weight[e], x.shape[1])
            out[start:end] = int_linear(x[start:end], wq, weight_scale[e], None if bias is None else bias[e], act,
                                        static_multiplier, max_abs_w)
        start = end
    return out
