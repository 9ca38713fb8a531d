"""The grouped-expert linear ops: ``torch.ops.bitlab.<format>_grouped_linear`` (ternary, int4, int8).

One call runs every expert of a mixture-of-experts projection on the tokens routed to it::

    y = bitlab.ternary_grouped_linear(x, group_ends, packed_weight, weight_scale, bias, act, act_multiplier, K)

``x [S, K]`` holds the routed rows sorted by expert; ``group_ends [E]`` (int64, cumulative) says where each
expert's rows end (expert ``e`` owns rows ``group_ends[e-1]:group_ends[e]``; an expert with no rows is skipped).
``weight [E, N, stored K]`` stacks the experts' weights in the format's layout (:mod:`bitlab_fx.quant.formats`),
``weight_scale`` their steps: ``[E, N]`` per channel, ``[E, N, G]`` per group, ``[E, 1]`` one per expert;
``bias [E, N]`` (optional, float). Each expert's rows are computed exactly as ``bitlab.<format>_linear`` computes
them with that expert's weight (the same arithmetic, bit for bit); ``act="per_tensor"`` without a static
``act_multiplier`` takes one multiplier over all ``S`` rows (the call's tensor), as a prepared model's quantizer does.
Returns ``y [S, N]`` in ``x``'s dtype.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..errors import KernelError
from ..quant.formats import WEIGHT_FORMATS
from . import reference
from ._schema import FLOAT_DTYPES, BitlabOp


def check_grouped_linear(op: str, fmt: str, x: Tensor, group_ends: Tensor, weight: Tensor, weight_scale: Tensor,
                         bias: Optional[Tensor], act: str, act_multiplier: Optional[Tensor], in_features: int) -> int:
    """Validate the arguments of a grouped linear op (everything but the values of ``group_ends``); return N."""
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise KernelError(f"bitlab.{op}: x must be the routed rows [S, K] in float32/bfloat16/float16, got "
                          f"{tuple(x.shape)} {x.dtype}")
    if weight.dim() != 3:
        raise KernelError(f"bitlab.{op}: weight must stack the experts [E, N, stored K], got {tuple(weight.shape)}")
    experts, n, stored = weight.shape
    k = x.shape[1]
    expected_dtype = torch.int8 if fmt == "int8" else torch.uint8
    if weight.dtype != expected_dtype or stored != WEIGHT_FORMATS[fmt].stored_bytes(1, k):
        raise KernelError(f"bitlab.{op}: the {fmt} weight {tuple(weight.shape)} {weight.dtype} does not hold K={k} "
                          f"inputs (expected {expected_dtype} [E, N, {WEIGHT_FORMATS[fmt].stored_bytes(1, k)}]); "
                          "the input does not match these experts")
    if in_features >= 0 and k != in_features:
        raise KernelError(f"bitlab.{op}: input has K={k} features but the experts have in_features={in_features}")
    if group_ends.dim() != 1 or group_ends.shape[0] != experts or group_ends.dtype != torch.int64:
        raise KernelError(f"bitlab.{op}: group_ends must be int64 [E={experts}] (cumulative row counts), got "
                          f"{tuple(group_ends.shape)} {group_ends.dtype}")
    scale_ok = (weight_scale.dim() == 2 and weight_scale.shape in ((experts, n), (experts, 1))) or (
        weight_scale.dim() == 3 and weight_scale.shape[:2] == (experts, n) and k % weight_scale.shape[2] == 0)
    if not scale_ok:
        raise KernelError(f"bitlab.{op}: weight_scale {tuple(weight_scale.shape)} does not fit {experts} experts of "
                          f"[{n}, {k}]; expected [E, N], [E, 1] or [E, N, groups] (groups dividing K)")
    if bias is not None and bias.shape != (experts, n):
        raise KernelError(f"bitlab.{op}: bias {tuple(bias.shape)} does not fit; expected [E={experts}, N={n}]")
    if act not in reference.ACT_MODES:
        raise KernelError(f"bitlab.{op}: act={act!r}; use one of {reference.ACT_MODES}")
    if act_multiplier is not None and act_multiplier.numel() != 1:
        raise KernelError(f"bitlab.{op}: a static act_multiplier holds one number, got {tuple(act_multiplier.shape)}")
    if any(t.device != x.device for t in (weight, weight_scale, group_ends)):
        raise KernelError(f"bitlab.{op}: the input is on {x.device} but the experts' buffers are on {weight.device}; "
                          "move the model or the input")
    return n


def group_bounds(op: str, group_ends: Tensor, rows: int) -> List[int]:
    """``group_ends`` as a list, checked: non-decreasing, ending at the number of rows."""
    ends = group_ends.tolist()
    if any(b < a for a, b in zip([0] + ends, ends)) or (ends and ends[-1] != rows):
        raise KernelError(f"bitlab.{op}: group_ends {ends[:8]}{'...' if len(ends) > 8 else ''} must be non-decreasing "
                          f"and end at the {rows} rows of x (cumulative counts of each expert's rows)")
    return ends


def tensor_multiplier(x: Tensor, act: str, act_multiplier: Optional[Tensor]) -> Optional[Tensor]:
    """The call's one multiplier for dynamic ``per_tensor`` (over all rows), else ``act_multiplier``."""
    if act == "per_tensor" and act_multiplier is None:
        return reference.act_multiplier(x.float(), "per_tensor", None)
    return act_multiplier


def _define(fmt: str) -> BitlabOp:
    op = f"{fmt}_grouped_linear"

    def impl(x: Tensor, group_ends: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
             act: str = "per_token", act_multiplier: Optional[Tensor] = None, in_features: int = -1) -> Tensor:
        check_grouped_linear(op, fmt, x, group_ends, weight, weight_scale, bias, act, act_multiplier, in_features)
        ends = group_bounds(op, group_ends, x.shape[0])
        return reference.grouped_linear(fmt, x, ends, weight, weight_scale, bias, act,
                                        tensor_multiplier(x, act, act_multiplier))

    impl.__name__ = op
    impl.__doc__ = f"Every expert's ``{fmt}_linear`` on its routed rows, in one call (see the module docstring)."
    defined = BitlabOp(impl)

    @defined.register_fake
    def _(x, group_ends, weight, weight_scale, bias=None, act="per_token", act_multiplier=None, in_features=-1):
        n = check_grouped_linear(op, fmt, x, group_ends, weight, weight_scale, bias, act, act_multiplier, in_features)
        return x.new_empty(x.shape[0], n)

    return defined


GROUPED_OPS = {fmt: _define(fmt) for fmt in WEIGHT_FORMATS}
