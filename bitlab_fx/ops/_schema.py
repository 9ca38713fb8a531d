"""The ``torch.ops.bitlab`` custom ops: schemas, argument checks and fake (meta) kernels.

The body of each op is the reference implementation, used on any device that has no faster kernel
registered (``cpu/`` registers the CPU one, ``cuda/`` the CUDA one).

What the arguments are: ``weight_scale`` is the weight *step* (``W ≈ wq * weight_scale``); ``act_multiplier``
(the last argument, passed by keyword) is the static activation *multiplier* (``xq = round(x * act_multiplier)``; a converted layer
keeps it in its ``act_multiplier`` buffer), or None for a dynamic one computed from ``x``.

``act_scale``, the positional argument before it, is the same multiplier under its old, misleading name
(schema version 1). It stays where it was so that programs exported by earlier versions (``.pt2`` files name
each argument, and torch's loader silently drops a name the schema no longer has: a static layer would turn
dynamic) load with the same meaning. New graphs pass ``act_multiplier=``; passing both is an error.

``bias_codes`` (schema version 3, keyword, last): an IntBias as int32 codes ``[N]`` on the step
``weight_scale / act_multiplier``, added to the exact integer sums before the rescale
(``y = fp32(acc + bias_codes) * weight_scale / act_multiplier``); it needs a static multiplier, int8 activations
and one weight scale per row, and replaces ``bias``. Programs of versions 1-2 have no such argument: it defaults
to None and they load and run as before.

``act_bits`` and ``bias_bits`` (schema version 4, keywords, last; defaults 8 and 0: earlier programs load
unchanged). ``act_bits``: the op quantizes ``x`` to signed codes of that many bits (2..8;
``qmax = 2**(act_bits-1) - 1``, ``s = qmax / max|x|`` when dynamic, codes clamped to ``[-qmax - 1, qmax]``): a
4-bit dynamic input quantizer fused into the layer's op. ``bias_bits`` (an IntBias on a *dynamic* multiplier,
2..32): the float ``bias`` is quantized at run time, per token, on that token's step
``weight_scale / s[token]`` (``codes[t, n] = clamp(round(bias[n] / (weight_scale[n] / s[t])), ...)``), and the
codes are added to the integer sums like ``bias_codes`` (a conv's token is a sample).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..errors import KernelError
from ..quant.packing import padded_k
from . import reference

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LIB = torch.library.Library("bitlab", "DEF")  # the ops' definitions (kept alive with the module)


class BitlabOp:
    """One ``torch.ops.bitlab`` op: defined with ``torch.library`` (not ``custom_op``, whose Python autograd
    wrapper runs on every call outside ``inference_mode``, ~10-20 us: HF ``generate`` runs under ``no_grad``).
    The function's annotations give the schema and its body is the default kernel for any device. The ops have
    no gradient (a converted model does not train): torch's autograd fallback warns if one is backpropagated
    through (``bfx.prepare_qat`` models train; their layers are not these ops)."""

    def __init__(self, fn):
        self.name = fn.__name__
        _LIB.define(self.name + torch.library.infer_schema(fn, mutates_args=()), tags=(torch.Tag.pt2_compliant_tag,))
        _LIB.impl(self.name, fn, "CompositeExplicitAutograd")
        self.qualname = f"bitlab::{self.name}"
        self.default = getattr(torch.ops.bitlab, self.name).default
        self.__doc__ = fn.__doc__

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)

    def register_fake(self, fn):
        torch.library.register_fake(self.qualname, fn, lib=_LIB)
        return fn

    def register_kernel(self, device_type: str, fn) -> None:
        torch.library.register_kernel(self.qualname, device_type, fn)

    def register_torch_dispatch(self, mode, rule) -> None:
        torch.library.register_torch_dispatch(self.qualname, mode, rule)
SCHEMA_VERSION = 4  # 4: ``act_bits=``, ``bias_bits=`` (per-token integer biases); 3: integer bias codes ``bias_codes=``; 2: the static multiplier is the keyword ``act_multiplier``
# (1: positional ``act_scale``)


def resolve_multiplier(op: str, act_scale: Optional[Tensor], act_multiplier: Optional[Tensor]) -> Optional[Tensor]:
    """The static multiplier of a call: ``act_multiplier``, or ``act_scale`` from a schema-version-1 program."""
    if act_scale is None:
        return act_multiplier
    if act_multiplier is not None:
        raise KernelError(f"bitlab.{op}: got both act_multiplier and act_scale (its old name); pass act_multiplier only")
    return act_scale


def _check_common(op: str, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], n: int,
                  act: str, static_multiplier: Optional[Tensor], bias_codes: Optional[Tensor] = None,
                  act_bits: int = 8, bias_bits: int = 0) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise KernelError(f"bitlab.{op}: input dtype {x.dtype} is not supported; pass float32, bfloat16 or float16")
    if act not in reference.ACT_MODES:
        raise KernelError(f"bitlab.{op}: act={act!r}; use one of {reference.ACT_MODES}")
    if x.device != weight.device:
        raise KernelError(f"bitlab.{op}: input is on {x.device} but the quantized weight is on {weight.device}; "
                          f"move the model with model.to({x.device.type!r}) or the input to {weight.device}")
    if weight_scale.dim() not in (1, 2) or (weight_scale.dim() == 1 and weight_scale.shape[0] not in (1, n)) \
            or (weight_scale.dim() == 2 and weight_scale.shape[0] != n):
        raise KernelError(f"bitlab.{op}: weight_scale of shape {tuple(weight_scale.shape)} does not fit {n} output "
                          f"channels; expected [1], [{n}] or [{n}, groups]")
    if bias is not None and bias.shape != (n,):
        raise KernelError(f"bitlab.{op}: bias of shape {tuple(bias.shape)} does not fit {n} output channels")
    if static_multiplier is not None and static_multiplier.numel() != 1:
        raise KernelError(f"bitlab.{op}: a static act_multiplier must hold one number, got shape {tuple(static_multiplier.shape)}")
    if bias_codes is not None:
        check_bias_codes(op, x, bias, bias_codes, n, act, static_multiplier, weight_scale)
    check_bits(op, act, act_bits, bias_bits, bias, bias_codes, weight_scale)


def check_bits(op: str, act: str, act_bits: int, bias_bits: int, bias: Optional[Tensor],
               bias_codes: Optional[Tensor], weight_scale: Tensor) -> None:
    """``act_bits`` (the codes the op quantizes ``x`` to) and ``bias_bits`` (a per-token integer bias)."""
    if not isinstance(act_bits, int) or not 2 <= act_bits <= 8:
        raise KernelError(f"bitlab.{op}: act_bits={act_bits!r}; use 2..8 (signed activation codes)")
    if act_bits != 8 and act == "none":
        raise KernelError(f"bitlab.{op}: act_bits={act_bits} with act='none' (float activations have no codes); "
                          "pass act='per_token' or 'per_tensor', or act_bits=8")
    if bias_bits == 0:
        return
    if not isinstance(bias_bits, int) or not 2 <= bias_bits <= 32:
        raise KernelError(f"bitlab.{op}: bias_bits={bias_bits!r}; use 0 (a float bias) or 2..32 (an IntBias "
                          "quantized per token)")
    if bias is None or bias_codes is not None:
        raise KernelError(f"bitlab.{op}: bias_bits={bias_bits} quantizes the float bias per token, so it needs "
                          f"bias= (a float [N] tensor) and no bias_codes (got bias={'None' if bias is None else 'given'}"
                          f", bias_codes={'None' if bias_codes is None else 'given'})")
    if act == "none":
        raise KernelError(f"bitlab.{op}: bias_bits={bias_bits} puts the bias on the step weight_scale / multiplier "
                          "of each token, and act='none' has no multiplier; pass bias_bits=0")
    if weight_scale.dim() != 1:
        raise KernelError(f"bitlab.{op}: bias_bits needs one weight scale per row ([1] or [N]), got per-group "
                          f"scales {tuple(weight_scale.shape)}; pass bias_bits=0 (a float bias)")


def check_bias_codes(op: str, x: Tensor, bias: Optional[Tensor], bias_codes: Tensor, n: int, act: str,
                     static_multiplier: Optional[Tensor], weight_scale: Tensor) -> None:
    """Integer bias codes are added to the integer sums: they need those sums on one step per row."""
    if bias_codes.dtype != torch.int32 or bias_codes.shape != (n,):
        raise KernelError(f"bitlab.{op}: bias_codes must be int32 [{n}], got {tuple(bias_codes.shape)} {bias_codes.dtype}")
    if bias_codes.device != x.device:
        raise KernelError(f"bitlab.{op}: bias_codes are on {bias_codes.device} but the input is on {x.device}")
    if bias is not None:
        raise KernelError(f"bitlab.{op}: got both bias and bias_codes; pass one (bias_codes: an IntBias, bias: float)")
    if act == "none" or static_multiplier is None:
        raise KernelError(f"bitlab.{op}: bias_codes are on the step weight_scale / act_multiplier, so they need int8 "
                          f"activations with a static act_multiplier (got act={act!r}, act_multiplier="
                          f"{'None' if static_multiplier is None else 'given'}); pass a float bias instead")
    if weight_scale.dim() != 1:
        raise KernelError(f"bitlab.{op}: bias_codes need one weight scale per row ([1] or [{n}]), got per-group "
                          f"scales {tuple(weight_scale.shape)}; pass a float bias instead")


def check_linear(op: str, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                 act: str, static_multiplier: Optional[Tensor], packed: bool, in_features: int = -1,
                 bias_codes: Optional[Tensor] = None,
                 act_bits: int = 8, bias_bits: int = 0) -> int:
    """Validate the arguments of a linear op; return the number of output features."""
    if weight.dim() != 2:
        raise KernelError(f"bitlab.{op}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, kw = weight.shape
    k = x.shape[-1] if x.dim() else 0
    if x.dim() == 0:
        raise KernelError(f"bitlab.{op}: input must have at least one dim [..., K]; got a scalar")
    if packed:
        if weight.dtype != torch.uint8:
            raise KernelError(f"bitlab.{op}: packed weight must be uint8, got {weight.dtype}")
        if in_features >= 0 and k != in_features:
            raise KernelError(f"bitlab.{op}: input has K={k} features but this layer has in_features={in_features}")
        if kw * 4 != padded_k(k):
            raise KernelError(f"bitlab.{op}: input has K={k} features but the packed weight {tuple(weight.shape)} "
                              f"holds K_pad={kw * 4} (expected {padded_k(k)}); the input does not match this layer")
    else:
        if weight.dtype != torch.int8:
            raise KernelError(f"bitlab.{op}: weight must be int8, got {weight.dtype}")
        if kw != k:
            raise KernelError(f"bitlab.{op}: input has K={k} features but the weight has shape {tuple(weight.shape)}")
    _check_common(op, x, weight, weight_scale, bias, n, act, static_multiplier, bias_codes, act_bits, bias_bits)
    if weight_scale.dim() == 2 and k % weight_scale.shape[1]:
        raise KernelError(f"bitlab.{op}: {weight_scale.shape[1]} scale groups do not divide K={k}")
    return n


@BitlabOp
def ternary_linear(x: Tensor, packed_weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                   act: str = "per_token", act_scale: Optional[Tensor] = None, in_features: int = -1,
                   act_multiplier: Optional[Tensor] = None, bias_codes: Optional[Tensor] = None,
                   act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    """``y = x @ (Wq * weight_scale).T + bias`` with ternary ``Wq`` packed 2 bits per value and ``x``
    quantized to int8 on the fly (``act``: ``"per_token"``, ``"per_tensor"`` or ``"none"``).
    ``in_features`` (the true K; -1: trust ``x``) lets the op reject inputs whose K only matches the padding."""
    static_multiplier = resolve_multiplier("ternary_linear", act_scale, act_multiplier)
    check_linear("ternary_linear", x, packed_weight, weight_scale, bias, act, static_multiplier, True, in_features,
                 bias_codes, act_bits=act_bits, bias_bits=bias_bits)
    return reference.ternary_linear(x, packed_weight, weight_scale, bias, act, static_multiplier, bias_codes=bias_codes,
                                    act_bits=act_bits, bias_bits=bias_bits)


@ternary_linear.register_fake
def _(x, packed_weight, weight_scale, bias=None, act="per_token", act_scale=None, in_features=-1, act_multiplier=None,
      bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = resolve_multiplier("ternary_linear", act_scale, act_multiplier)
    n = check_linear("ternary_linear", x, packed_weight, weight_scale, bias, act, static_multiplier, True, in_features,
                     bias_codes, act_bits=act_bits, bias_bits=bias_bits)
    return x.new_empty(*x.shape[:-1], n)


@BitlabOp
def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                act: str = "per_token", act_scale: Optional[Tensor] = None,
                act_multiplier: Optional[Tensor] = None, bias_codes: Optional[Tensor] = None,
                act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    """Like ``ternary_linear`` with int8 weights ``[N, K]``."""
    static_multiplier = resolve_multiplier("int8_linear", act_scale, act_multiplier)
    check_linear("int8_linear", x, weight, weight_scale, bias, act, static_multiplier, packed=False, bias_codes=bias_codes,
                 act_bits=act_bits, bias_bits=bias_bits)
    return reference.int8_linear(x, weight, weight_scale, bias, act, static_multiplier, bias_codes=bias_codes,
                                 act_bits=act_bits, bias_bits=bias_bits)


@int8_linear.register_fake
def _(x, weight, weight_scale, bias=None, act="per_token", act_scale=None, act_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = resolve_multiplier("int8_linear", act_scale, act_multiplier)
    n = check_linear("int8_linear", x, weight, weight_scale, bias, act, static_multiplier, packed=False,
                     bias_codes=bias_codes, act_bits=act_bits, bias_bits=bias_bits)
    return x.new_empty(*x.shape[:-1], n)


def conv2d_out_shape(op: str, x: Tensor, weight_shape: List[int], stride: List[int], padding: List[int],
                     dilation: List[int], groups: int) -> List[int]:
    if x.dim() != 4:
        raise KernelError(f"bitlab.{op}: input must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    cout, cin_g, kh, kw = weight_shape
    if x.shape[1] != cin_g * groups:
        raise KernelError(f"bitlab.{op}: input has {x.shape[1]} channels but the weight {list(weight_shape)} "
                          f"with groups={groups} expects {cin_g * groups}")
    out = [x.shape[0], cout]
    for i, (size, k) in enumerate(((x.shape[2], kh), (x.shape[3], kw))):
        o = (size + 2 * padding[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1
        if o <= 0:
            raise KernelError(f"bitlab.{op}: input of shape {tuple(x.shape)} is too small for kernel {kh}x{kw}")
        out.append(o)
    return out


def check_conv2d(op: str, x, weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups,
                 act, static_multiplier, packed: bool, bias_codes: Optional[Tensor] = None,
                 act_bits: int = 8, bias_bits: int = 0) -> List[int]:
    if len(weight_shape) != 4 or len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise KernelError(f"bitlab.{op}: weight_shape must have 4 ints and stride/padding/dilation 2 each")
    if packed:
        k = weight_shape[1] * weight_shape[2] * weight_shape[3]
        if weight.dtype != torch.uint8 or tuple(weight.shape) != (weight_shape[0], padded_k(k) // 4):
            raise KernelError(f"bitlab.{op}: packed weight {tuple(weight.shape)} {weight.dtype} does not match "
                              f"weight_shape {list(weight_shape)}")
    elif weight.dtype != torch.int8 or list(weight.shape) != list(weight_shape):
        raise KernelError(f"bitlab.{op}: weight must be int8 of shape {list(weight_shape)}, got {tuple(weight.shape)} {weight.dtype}")
    if weight_scale.dim() != 1:
        raise KernelError(f"bitlab.{op}: conv weight scales must be per tensor [1] or per channel [Cout]")
    _check_common(op, x, weight, weight_scale, bias, weight_shape[0], act, static_multiplier, bias_codes,
                  act_bits, bias_bits)
    return conv2d_out_shape(op, x, weight_shape, stride, padding, dilation, groups)


@BitlabOp
def ternary_conv2d(x: Tensor, packed_weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                   weight_shape: List[int], stride: List[int], padding: List[int], dilation: List[int], groups: int,
                   act: str = "per_token", act_scale: Optional[Tensor] = None,
                   act_multiplier: Optional[Tensor] = None, bias_codes: Optional[Tensor] = None,
                   act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    """conv2d with packed ternary weights of ``weight_shape``; ``act="per_token"`` = one int8 scale per sample."""
    static_multiplier = resolve_multiplier("ternary_conv2d", act_scale, act_multiplier)
    check_conv2d("ternary_conv2d", x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation,
                 groups, act, static_multiplier, packed=True, bias_codes=bias_codes,
                 act_bits=act_bits, bias_bits=bias_bits)
    return reference.ternary_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation,
                                    groups, act, static_multiplier, bias_codes=bias_codes,
                                    act_bits=act_bits, bias_bits=bias_bits)


@ternary_conv2d.register_fake
def _(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups, act="per_token",
      act_scale=None, act_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = resolve_multiplier("ternary_conv2d", act_scale, act_multiplier)
    shape = check_conv2d("ternary_conv2d", x, packed_weight, weight_scale, bias, weight_shape, stride, padding,
                         dilation, groups, act, static_multiplier, packed=True, bias_codes=bias_codes,
                         act_bits=act_bits, bias_bits=bias_bits)
    return x.new_empty(shape)


@BitlabOp
def int8_conv2d(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], stride: List[int],
                padding: List[int], dilation: List[int], groups: int, act: str = "per_token",
                act_scale: Optional[Tensor] = None, act_multiplier: Optional[Tensor] = None,
                bias_codes: Optional[Tensor] = None,
                act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    """conv2d with int8 weights ``[Cout, Cin/groups, kh, kw]``."""
    static_multiplier = resolve_multiplier("int8_conv2d", act_scale, act_multiplier)
    check_conv2d("int8_conv2d", x, weight, weight_scale, bias, list(weight.shape), stride, padding, dilation, groups,
                 act, static_multiplier, packed=False, bias_codes=bias_codes, act_bits=act_bits, bias_bits=bias_bits)
    return reference.int8_conv2d(x, weight, weight_scale, bias, stride, padding, dilation, groups, act, static_multiplier,
                                 bias_codes=bias_codes, act_bits=act_bits, bias_bits=bias_bits)


@int8_conv2d.register_fake
def _(x, weight, weight_scale, bias, stride, padding, dilation, groups, act="per_token", act_scale=None, act_multiplier=None,
      bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = resolve_multiplier("int8_conv2d", act_scale, act_multiplier)
    shape = check_conv2d("int8_conv2d", x, weight, weight_scale, bias, list(weight.shape), stride, padding, dilation,
                         groups, act, static_multiplier, packed=False, bias_codes=bias_codes,
                         act_bits=act_bits, bias_bits=bias_bits)
    return x.new_empty(shape)


# -- low-bit weights (2..4 bits) packed two per byte, and activation quantize-dequantize -------------------
def _check_int4_weight(op: str, packed_weight: Tensor, k: int, n: int, in_features: int = -1) -> None:
    if packed_weight.dtype != torch.uint8 or packed_weight.dim() != 2:
        raise KernelError(f"bitlab.{op}: packed weight must be uint8 [N, ceil(K/2)], got {tuple(packed_weight.shape)} "
                          f"{packed_weight.dtype}")
    if in_features >= 0 and k != in_features:
        raise KernelError(f"bitlab.{op}: input has K={k} features but this layer has in_features={in_features}")
    if packed_weight.shape != (n, (k + 1) // 2):
        raise KernelError(f"bitlab.{op}: packed weight {tuple(packed_weight.shape)} does not hold [{n}, K={k}] "
                          f"int4 values (expected [{n}, {(k + 1) // 2}]); the input does not match this layer")


def check_int4_linear(x: Tensor, packed_weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], act: str,
                      static_multiplier: Optional[Tensor], in_features: int, bias_codes: Optional[Tensor] = None,
                      act_bits: int = 8, bias_bits: int = 0) -> int:
    if x.dim() == 0:
        raise KernelError("bitlab.int4_linear: input must have at least one dim [..., K]; got a scalar")
    n = packed_weight.shape[0] if packed_weight.dim() == 2 else -1
    _check_int4_weight("int4_linear", packed_weight, x.shape[-1], n, in_features)
    _check_common("int4_linear", x, packed_weight, weight_scale, bias, n, act, static_multiplier, bias_codes,
                  act_bits, bias_bits)
    if weight_scale.dim() == 2 and x.shape[-1] % weight_scale.shape[1]:
        raise KernelError(f"bitlab.int4_linear: {weight_scale.shape[1]} scale groups do not divide K={x.shape[-1]}")
    return n


@BitlabOp
def int4_linear(x: Tensor, packed_weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                act: str = "per_token", act_scale: Optional[Tensor] = None, in_features: int = -1,
                act_multiplier: Optional[Tensor] = None, bias_codes: Optional[Tensor] = None,
                act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    """Like ``ternary_linear`` with signed 2..4-bit weights packed two per byte along K (low nibble = even k),
    uint8 ``[N, ceil(K/2)]`` (:func:`bitlab_fx.quant.packing.pack_int4`)."""
    static_multiplier = resolve_multiplier("int4_linear", act_scale, act_multiplier)
    check_int4_linear(x, packed_weight, weight_scale, bias, act, static_multiplier, in_features, bias_codes,
                      act_bits=act_bits, bias_bits=bias_bits)
    return reference.int4_linear(x, packed_weight, weight_scale, bias, act, static_multiplier, in_features,
                                 bias_codes=bias_codes, act_bits=act_bits, bias_bits=bias_bits)


@int4_linear.register_fake
def _(x, packed_weight, weight_scale, bias=None, act="per_token", act_scale=None, in_features=-1, act_multiplier=None,
      bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = resolve_multiplier("int4_linear", act_scale, act_multiplier)
    n = check_int4_linear(x, packed_weight, weight_scale, bias, act, static_multiplier, in_features, bias_codes,
                          act_bits=act_bits, bias_bits=bias_bits)
    return x.new_empty(*x.shape[:-1], n)


def check_int4_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups,
                      act, static_multiplier, bias_codes: Optional[Tensor] = None,
                      act_bits: int = 8, bias_bits: int = 0) -> List[int]:
    if len(weight_shape) != 4 or len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise KernelError("bitlab.int4_conv2d: weight_shape must have 4 ints and stride/padding/dilation 2 each")
    _check_int4_weight("int4_conv2d", packed_weight, weight_shape[1] * weight_shape[2] * weight_shape[3], weight_shape[0])
    if weight_scale.dim() != 1:
        raise KernelError("bitlab.int4_conv2d: conv weight scales must be per tensor [1] or per channel [Cout]")
    _check_common("int4_conv2d", x, packed_weight, weight_scale, bias, weight_shape[0], act, static_multiplier,
                  bias_codes, act_bits, bias_bits)
    return conv2d_out_shape("int4_conv2d", x, weight_shape, stride, padding, dilation, groups)


@BitlabOp
def int4_conv2d(x: Tensor, packed_weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                weight_shape: List[int], stride: List[int], padding: List[int], dilation: List[int], groups: int,
                act: str = "per_token", act_scale: Optional[Tensor] = None,
                act_multiplier: Optional[Tensor] = None, bias_codes: Optional[Tensor] = None,
                act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    """conv2d with signed 2..4-bit weights of ``weight_shape`` packed two per byte (flattened to ``[Cout, K]``)."""
    static_multiplier = resolve_multiplier("int4_conv2d", act_scale, act_multiplier)
    check_int4_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups, act,
                      static_multiplier, bias_codes, act_bits=act_bits, bias_bits=bias_bits)
    return reference.int4_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation,
                                 groups, act, static_multiplier, bias_codes=bias_codes,
                                 act_bits=act_bits, bias_bits=bias_bits)


@int4_conv2d.register_fake
def _(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups, act="per_token",
      act_scale=None, act_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = resolve_multiplier("int4_conv2d", act_scale, act_multiplier)
    return x.new_empty(check_int4_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding,
                                         dilation, groups, act, static_multiplier, bias_codes, act_bits=act_bits, bias_bits=bias_bits))


def check_quantize_dequantize(x: Tensor, multiplier: Optional[Tensor], bits: int, granularity: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise KernelError(f"bitlab.quantize_dequantize: input dtype {x.dtype} is not supported; pass a float tensor")
    if not 2 <= bits <= 8:
        raise KernelError(f"bitlab.quantize_dequantize: bits={bits}; use 2..8")
    if granularity not in ("per_tensor", "per_token"):
        raise KernelError(f"bitlab.quantize_dequantize: granularity={granularity!r}; use 'per_tensor' or 'per_token'")
    if multiplier is not None and multiplier.numel() != 1:
        raise KernelError(f"bitlab.quantize_dequantize: a static multiplier holds one number, got shape {tuple(multiplier.shape)}")


@BitlabOp
def quantize_dequantize(x: Tensor, multiplier: Optional[Tensor], bits: int, signed: bool,
                        granularity: str = "per_tensor", token_dims: int = 1) -> Tensor:
    """``clamp(round(x * s), qmin, qmax) / s``: a converted activation quantizer (static ``multiplier`` ``s``,
    or dynamic when None: ``s = qmax / max|x|`` per tensor or per token of ``token_dims`` trailing dims)."""
    check_quantize_dequantize(x, multiplier, bits, granularity)
    return reference.quantize_dequantize(x, multiplier, bits, signed, granularity, token_dims)


@quantize_dequantize.register_fake
def _(x, multiplier, bits, signed, granularity="per_tensor", token_dims=1):
    check_quantize_dequantize(x, multiplier, bits, granularity)
    return torch.empty_like(x)
