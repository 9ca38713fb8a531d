"""Modules that make a captured graph follow ``.train()``/``.eval()`` where capture baked the mode in.

Both frontends run ``forward`` once, in the mode the model is in, so ``F.dropout(x, p, training=self.training)``,
an attention's ``dropout_p=p if self.training else 0.0`` or batch-norm's ``training`` flag become constants.
The capture passes replace such calls by these modules, whose ``forward`` reads ``self.training``:

- :class:`AttentionDropout`: ``scaled_dot_product_attention`` with ``dropout_p`` only in train mode;
- :class:`ModeBatchNorm`: ``batch_norm`` on the captured running statistics, batch statistics (and a
  running-stat update) only in train mode, like ``nn.BatchNorm*``;
- :class:`ModeCall`: any other call whose constant arguments differ between a train-mode and an eval-mode
  trace (fx frontend), called with the arguments of the current mode.

Functional dropout becomes the matching ``nn.Dropout*`` module.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..passes._common import unique_name

aten = torch.ops.aten

# functional dropout -> the module that applies it only in train mode
DROPOUT_MODULES = {F.dropout: nn.Dropout, F.alpha_dropout: nn.AlphaDropout,
                   F.feature_alpha_dropout: nn.FeatureAlphaDropout, F.dropout1d: nn.Dropout1d,
                   F.dropout2d: nn.Dropout2d, F.dropout3d: nn.Dropout3d}
SDPA = F.scaled_dot_product_attention


class AttentionDropout(nn.Module):
    """``aten.scaled_dot_product_attention`` whose ``dropout_p`` follows ``.train()``/``.eval()``: capture
    bakes the ``dropout_p`` of the mode the model was captured in (HF attention passes ``p if training else 0``)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, q, k, v, attn_mask=None, is_causal=False, **kwargs):
        return aten.scaled_dot_product_attention.default(q, k, v, attn_mask, self.p if self.training else 0.0,
                                                         is_causal, **kwargs)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ModeBatchNorm(nn.Module):
    """``batch_norm`` whose ``training`` flag follows ``.train()``/``.eval()``; the statistics and affine
    parameters stay where capture put them (they are passed in), ``num_batches_tracked`` counts train calls."""

    def __init__(self, momentum: Optional[float], eps: float):
        super().__init__()
        self.momentum, self.eps = momentum, eps

    def forward(self, x, weight, bias, running_mean, running_var, num_batches_tracked=None):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(num_batches_tracked)
        use_batch = self.training or running_mean is None
        return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch, factor, self.eps)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, eps={self.eps}"


class ModeCall(nn.Module):
    """``fn(*args, **kwargs)`` with the constant arguments that differ between modes taken from ``train``/``eval``
    (``{position or keyword: value}``); ``method``: call ``args[0].<method>`` instead of ``fn``."""

    def __init__(self, fn: Union[Callable, str], train: Dict[Union[int, str], Any], eval: Dict[Union[int, str], Any]):
        super().__init__()
        self.fn, self.train_args, self.eval_args = fn, dict(train), dict(eval)

    def forward(self, *args, **kwargs):
        args = list(args)
        for key, value in (self.train_args if self.training else self.eval_args).items():
            if isinstance(key, int):
                args[key] = value
            else:
                kwargs[key] = value
        if isinstance(self.fn, str):
            return getattr(args[0], self.fn)(*args[1:], **kwargs)
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        name = self.fn if isinstance(self.fn, str) else getattr(self.fn, "__name__", repr(self.fn))
        return f"{name}, train={self.train_args}, eval={self.eval_args}"


def replace_with_module(gm: fx.GraphModule, node: fx.Node, base: str, module: nn.Module, args: tuple,
                        kwargs: Optional[dict] = None) -> fx.Node:
    """Replace ``node`` by a ``call_module`` of ``module`` (added to ``gm`` under a new name from ``base``)."""
    name = unique_name(gm, base)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, args, kwargs or {})
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


_DROPOUT_ARGS = ("input", "p", "training", "inplace")
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _bound(node: fx.Node, names) -> dict:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _key_name(key, names) -> str:
    return names[key] if isinstance(key, int) and key < len(names) else key


def follow_mode(gm: fx.GraphModule, node: fx.Node, train: dict, eval: dict) -> bool:
    """Make ``node`` follow the module mode, given the constant arguments that differ: their values in a train-mode
    and an eval-mode capture (``{position or keyword: value}``). False when the node cannot be rewritten."""
    if node.op == "call_function" and node.target in DROPOUT_MODULES:
        keys = {_key_name(k, _DROPOUT_ARGS) for k in train}
        bound = _bound(node, _DROPOUT_ARGS)
        p = bound.get("p", 0.5)
        if keys == {"training"} and isinstance(p, (int, float)) and all(train.values()) and not any(eval.values()):
            module = DROPOUT_MODULES[node.target](float(p), bool(bound.get("inplace", False)))
            replace_with_module(gm, node, "dropout", module, (bound["input"],))
            return True
    if node.op == "call_function" and node.target is SDPA:
        keys = {_key_name(k, _SDPA_ARGS) for k in train}
        if keys == {"dropout_p"} and not any(eval.values()):
            bound = _bound(node, _SDPA_ARGS)
            bound.pop("dropout_p", None)
            q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
            replace_with_module(gm, node, "attention_dropout", AttentionDropout(float(next(iter(train.values())))),
                                (q, k, v), bound)
            return True
    if node.op in ("call_function", "call_method"):
        replace_with_module(gm, node, "mode_call", ModeCall(node.target, train, eval), node.args, dict(node.kwargs))
        return True
    return False
