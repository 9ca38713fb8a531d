"""The one arithmetic of a quantized layer: integer codes in, float output out.

Every path that computes a quantized linear/conv layer from its integer codes (the reference ops, the
prepared model's exact layers in ``exact_layers.py``, and through their bitwise tests the CPU and
Triton kernels) goes through these functions, so a converted model reproduces its prepared model::

    acc[m, n]  = sum_k xq[m, k] * wq[n, k]                      exact (an integer)
    y[m, n]    = fp32(acc) * w_step[n] / x_mult[m]               fp32, left to right
    y[m, n]    = sum_g(fp32(acc[m, n, g]) * w_step[n, g]) / x_mult[m]     (per-group, g left to right)
    y          = y + bias, then cast to the input dtype
    y[m, n]    = fp32(acc[m, n] + bias_codes[n]) * w_step[n] / x_mult       an IntBias: integer codes on the step
                                                                            w_step / x_mult join the exact sum
    y[m, n]    = fp32(acc[m, n] + bias_codes[m, n]) * w_step[n] / x_mult[m]  an IntBias on a per-token multiplier:
                 bias_codes[m, n] = clamp(round(b[n] / (w_step[n] / x_mult[m])), ...)   one step per token

``xq = clamp(round(x * x_mult), -128, 127)`` (round half to even) with ``x_mult`` the activation
*multiplier* (``127 / max|x|``, or a static one); ``w_step`` is the weight *step* (``W ≈ wq * w_step``).

The integer products are exact: they run in fp32 where every partial sum is an integer below 2**24
(whatever the summation order, the ISA or the BLAS), and in float64 chunks otherwise.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

FP32_EXACT = 2 ** 24  # every integer of magnitude up to this is exact in fp32
X_CODE_MAX = 128  # |xq| <= 128 for int8 activations
EPS = 1e-5  # guards every max/mean that could be zero (all-zero rows give scale EPS, never NaN)


# -- codes: the one definition of each quantity ------------------------------------------------------

def multiplier(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """The activation multiplier ``qmax / max(amax, EPS)`` in fp32. Written as torch evaluates it
    (``qmax / t`` is ``t.reciprocal() * qmax``), which the C and Triton kernels reproduce."""
    return qmax / amax.float().clamp(min=EPS)


def codes(x: torch.Tensor, mult: torch.Tensor, qmin: int, qmax: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Activation codes ``clamp(round(x * mult), qmin, qmax)`` (fp32 whole numbers; round half to even); ``out``: an
    fp32 tensor of ``x``'s shape to write them into (a scratch tensor of the caller's), else a new one."""
    return _round_clamp(torch.mul(x, mult, out=out) if out is not None else x * mult, qmin, qmax)


def _round_clamp(q: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(q), qmin, qmax)``, in place on the fresh temporary ``q`` when no gradient is recorded: the same
    numbers without two more tensors of ``q``'s size (on CPU each is a new allocation, often page faults too: a
    1024x1024 weight's codes took 2.9 ms out of place, 0.45 ms in place, 1 thread)."""
    if q.requires_grad:
        return torch.clamp(torch.round(q), qmin, qmax)
    return q.round_().clamp_(qmin, qmax)


def int8_codes(x: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """The int8 codes every bitlab op computes from its input: :func:`codes` on ``[-128, 127]``."""
    return codes(x, mult, -128, 127)


def bias_codes(b: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """IntBias codes ``clamp(round(b / step), -2**(bits-1), 2**(bits-1)-1)`` (fp32 whole numbers, no gradient);
    ``step = input_step * weight_step = w_step / x_mult``."""
    with torch.no_grad():
        q = 2 ** (bits - 1)
        return torch.clamp(torch.round(b.detach().float() / step), -q, q - 1)


def token_bias_step(w_step: torch.Tensor, x_mult: torch.Tensor) -> torch.Tensor:
    """The IntBias steps ``[T, N]`` when the input multiplier is one per token (``x_mult``: T numbers, e.g. ``[T, 1]``
    or ``[B, 1, 1, 1]``; one number gives ``[1, N]``): ``w_step[n] / x_mult[t]``, input step times weight step, as
    Brevitas computes a bias step from a run-time input scale."""
    return w_step.float().reshape(1, -1) / x_mult.float().reshape(-1, 1)


def token_bias_codes(b: torch.Tensor, w_step: torch.Tensor, x_mult: torch.Tensor, bias_bits: int) -> torch.Tensor:
    """IntBias codes ``[T, N]`` of the bias ``b [N]`` on the per-token steps of :func:`token_bias_step`. Made at run
    time (the steps change with every input): the kernels compute the same fp32 expression in their epilogue."""
    return bias_codes(b, token_bias_step(w_step, x_mult), bias_bits)


def weight_codes(w: torch.Tensor, step: torch.Tensor, qmax: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight codes ``clamp(round(w / step), -qmax, qmax)`` (a division by the step, not a multiplication); ``out``:
    an fp32 tensor of ``w``'s shape to write them into (a scratch tensor of the caller's), else a new one."""
    return _round_clamp(torch.div(w, step, out=out) if out is not None else w / step, -qmax, qmax)


# -- integer products and the rescale ----------------------------------------------------------------


def exact_chunk(max_abs_w: int, max_abs_x: int = X_CODE_MAX) -> int:
    """The longest dot product of codes whose partial sums all stay exact in fp32."""
    return max(1, (FP32_EXACT - 1) // (max_abs_x * max_abs_w))


def _no_autocast(fn):
    """Integer products must not be cast down by an enclosing ``torch.autocast`` (a bf16 result rounds the sum)."""
    def wrapped(xq, *args, **kwargs):
        with torch.autocast(xq.device.type, enabled=False):
            return fn(xq, *args, **kwargs)
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


# ``xq [M, K] @ wq [N, K].T`` of int8 tensors as one opaque op: under torch.compile inductor then writes both operands
# in their natural row-major layout (given ``torch._int_mm(xq, wq.t())`` directly, it wrote the weight codes
# transposed, a strided pass that cost more than the int8 GEMM saves).
_LIB = torch.library.Library("bitlab", "FRAGMENT")
_LIB.define("int8_mm_nt(Tensor xq, Tensor wq) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
_LIB.impl("int8_mm_nt", lambda xq, wq: torch._int_mm(xq.contiguous(), wq.contiguous().t()),
          "CompositeExplicitAutograd")
torch.library.register_fake("bitlab::int8_mm_nt", lambda xq, wq: xq.new_empty((xq.shape[0], wq.shape[0]),
                                                                                 dtype=torch.int32), lib=_LIB)


def int8_gemm_fits(xq: torch.Tensor, wq: torch.Tensor, max_abs_w: int) -> bool:
    """Whether :func:`int_matmul` runs on torch's int8 GEMM (``torch._int_mm``, oneDNN: AMX, AVX-512 VNNI or AVX2
    code by the CPU): CPU tensors of int8 codes (``|xq| <= 128``, ``|wq| <= max_abs_w <= 127``; the codes of every
    quantized layer input fit int8, ``passes/layer_input.py``) whose int32 sums cannot overflow. Not for ``K = 1``:
    torch 2.13's ``_int_mm`` returns garbage for ``[M, 1] @ [1, N]`` (``N > 1``; the transposed weight's strides are
    ambiguous), the fp32 product is exact there anyway."""
    return (xq.device.type == "cpu" and wq.device.type == "cpu" and max_abs_w <= 127
            and 2 <= xq.shape[-1] and xq.shape[-1] * X_CODE_MAX * max_abs_w < 2 ** 31)


def as_int8(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes of int8 range as an int8 tensor (itself when it already is one; exact for whole numbers)."""
    return codes if codes.dtype == torch.int8 else codes.to(torch.int8)


@_no_autocast
def int_matmul(xq: torch.Tensor, wq: torch.Tensor, max_abs_w: int) -> torch.Tensor:
    """``xq [M, K] @ wq [N, K].T`` for integer-valued tensors, exact: int32 ``[M, N]`` from torch's int8 GEMM on CPU
    (:func:`int8_gemm_fits`; 3-6x faster than an fp32 matmul of the codes at training shapes), else fp32 when ``K``
    is short enough (:func:`exact_chunk`), else the fp32 products of exact chunks summed in float64."""
    if int8_gemm_fits(xq, wq, max_abs_w):
        return torch.ops.bitlab.int8_mm_nt(as_int8(xq), as_int8(wq))
    xf, wf = xq.float(), wq.float()
    k = xf.shape[-1]
    chunk = exact_chunk(max_abs_w)
    if k <= chunk:
        return xf @ wf.t()
    acc = torch.zeros(xf.shape[0], wf.shape[0], dtype=torch.float64, device=xf.device)
    for start in range(0, k, chunk):
        acc += (xf[:, start:start + chunk] @ wf[:, start:start + chunk].t()).double()
    return acc


@_no_autocast
def int_matmul_groups(xq: torch.Tensor, wq: torch.Tensor, groups: int, max_abs_w: int) -> torch.Tensor:
    """Per-group integer products ``acc [M, N, G]`` of ``xq [M, K]`` and ``wq [N, K]`` (groups of ``K/G``
    columns): fp32 when a group is short enough to be exact (:func:`exact_chunk`), else float64."""
    m, k = xq.shape
    n = wq.shape[0]
    size = k // groups
    if size > exact_chunk(max_abs_w):
        return torch.einsum("mgk,ngk->mng", xq.double().reshape(m, groups, size), wq.double().reshape(n, groups, size))
    return torch.einsum("mgk,ngk->mng", xq.float().reshape(m, groups, size), wq.float().reshape(n, groups, size))


@_no_autocast
def int_conv(xq: torch.Tensor, wq: torch.Tensor, stride, padding, dilation, groups: int, max_abs_w: int) -> torch.Tensor:
    """conv1d/conv2d of integer-valued tensors, exact: fp32 on CPU when every output sums few enough
    products (a direct convolution of integers), float64 otherwise."""
    conv = F.conv1d if xq.dim() == 3 else F.conv2d
    k = wq[0].numel()
    if xq.device.type == "cpu" and k <= exact_chunk(max_abs_w):
        return conv(xq.float(), wq.float(), None, stride, padding, dilation, groups)
    return conv(xq.double(), wq.double(), None, stride, padding, dilation, groups)


def add_bias_codes(acc: torch.Tensor, bias_codes: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``acc + bias_codes`` exactly, then rounded once to fp32: integer bias codes join the exact integer sums as the
    kernels add them to their int32 accumulators before the int -> fp32 conversion. ``bias_codes [N]`` run along
    ``channel_dim``; per-token codes ``[T, N]`` (:func:`token_bias_codes`) along the first two dims of ``acc``
    (the rows of a linear ``[M, N]``, the samples of a conv ``[B, N, ...]``)."""
    shape: List[int] = [1] * acc.dim()
    if bias_codes.dim() == 2:
        shape[0] = bias_codes.shape[0]
        shape[1] = -1
    else:
        shape[channel_dim] = -1
    return (acc.double() + bias_codes.double().reshape(shape)).float()


def _scaled(acc: torch.Tensor, w_step: torch.Tensor) -> torch.Tensor:
    """``fp32(acc) * w_step``, in place when ``acc`` is already an fp32 temporary (same values, no allocation)."""
    if acc.dtype == torch.float32 and not acc.requires_grad and acc.shape == torch.broadcast_shapes(acc.shape, w_step.shape):
        return acc.mul_(w_step)
    return acc.float() * w_step


def rescale_linear(acc: torch.Tensor, w_step: torch.Tensor, x_mult: torch.Tensor) -> torch.Tensor:
    """``fp32(acc) * w_step / x_mult`` (``acc [M, N]``, ``w_step [N]`` or ``[1]``), or the per-group sum
    ``sum_g(fp32(acc) * w_step) / x_mult`` (``acc [M, N, G]``, ``w_step [N, G]``); ``x_mult [M, 1]`` or ``[1, 1]``."""
    ws = w_step.float()
    if ws.dim() == 2:  # summed left to right, as the kernels do (torch's sum(-1) would pick its own order)
        products = acc.float() * ws
        y = products[..., 0]
        for g in range(1, products.shape[-1]):
            y = y + products[..., g]
        return y / x_mult
    return _scaled(acc, ws).div_(x_mult)


def rescale_conv(acc: torch.Tensor, w_step: torch.Tensor, x_mult: torch.Tensor) -> torch.Tensor:
    """``fp32(acc) * w_step[c] / x_mult[b]`` for a conv output ``[B, C, ...]`` (``x_mult`` shaped to broadcast)."""
    shape = [1, -1] + [1] * (acc.dim() - 2)
    return _scaled(acc, w_step.float().reshape(shape)).div_(x_mult)


def add_bias(y: torch.Tensor, bias: Optional[torch.Tensor], channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``y + bias`` in fp32 (bias along ``channel_dim``: -1 for linear, 1 for conv), cast to ``dtype``."""
    if bias is not None:
        shape: List[int] = [1] * y.dim()
        shape[channel_dim] = -1
        y = y.add_(bias.float().reshape(shape)) if y.dtype == torch.float32 else y + bias.float().reshape(shape)
    return y.to(dtype)


# -- a whole layer from its codes ----------------------------------------------------------------

def linear_from_codes(xq: torch.Tensor, s: torch.Tensor, wq: torch.Tensor, weight_scale: torch.Tensor,
                      bias: Optional[torch.Tensor], dtype: torch.dtype, max_abs_w: int = 127,
                      bias_codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y [M, N]`` from int8 codes ``xq [M, K]`` (multiplier ``s [M, 1]`` or ``[1, 1]``) and integer weights
    ``wq [N, K]`` (step ``weight_scale``): the shared arithmetic. ``bias_codes [N]`` (an IntBias, one weight step
    per row) join the integer sums; ``bias`` is a float bias added after the rescale."""
    ws = weight_scale.float()
    if ws.dim() == 2:
        acc = int_matmul_groups(xq, wq, ws.shape[1], max_abs_w)
    else:
        acc = int_matmul(xq, wq, max_abs_w)
        if bias_codes is not None:
            acc = add_bias_codes(acc, bias_codes, -1)
    return add_bias(rescale_linear(acc, ws, s), bias, -1, dtype)


def conv_from_codes(xq: torch.Tensor, s: torch.Tensor, wq: torch.Tensor, weight_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], stride, padding, dilation, groups: int, dtype: torch.dtype,
                    max_abs_w: int = 127, bias_codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A conv output from int8 codes ``xq`` (multiplier ``s`` per sample ``[B, 1...]`` or ``[1...]``) and integer
    weights ``wq`` (one step per output channel): the shared arithmetic (``bias_codes``: as in linear_from_codes)."""
    acc = int_conv(xq, wq, stride, padding, dilation, groups, max_abs_w)
    if bias_codes is not None:
        acc = add_bias_codes(acc, bias_codes, 1)
    return add_bias(rescale_conv(acc, weight_scale, s), bias, 1, dtype)
