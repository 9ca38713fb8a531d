"""Every matmul-shaped weight a summary's layer rows do not cover, with why it stays float.

``bfx.summary`` lists the layers prepare_qat saw; this scan finds the other parameters of two or more dims (a
model's matrices and expert stacks: embedding tables, bitlab_fx's own modules and weights already in a row are
left out) and gives each the first reason of :data:`REASONS` that applies, so the summary's quantized share by
parameters is the share that actually runs quantized.

>>> import torch
>>> m = torch.nn.Module(); m.attn = torch.nn.MultiheadAttention(8, 2)
>>> {k: v[1][:40] for k, v in float_weights(m, covered=set()).items()}
{'attn.in_proj_weight': 'nn.MultiheadAttention is not supported (', 'attn.out_proj.weight': 'nn.MultiheadAttention is not supported ('}
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

from torch import nn

from .passes.layer_forms import PARAMETRIZED, float_reason, is_parametrized

_MHA = ("nn.MultiheadAttention is not supported (its projections run inside F.multi_head_attention_forward): left "
        "float; write the attention with nn.Linear projections to quantize them")
_EXPERTS = ("a 3-D weight used with batched matmuls outside a transformers experts module (only modules of "
            "transformers' use_experts_implementation are quantized, bitlab_fx.nn.experts): left float")
_UNTRACED = ("owned by a module that did not trace (its uses cannot be seen without a graph): left float; make the "
             "module traceable, or use it through nn.Linear/nn.Conv modules")
_OTHER = "not used through a supported layer call (nn.Linear, nn.Conv1d, nn.Conv2d, F.linear/F.conv on it): left float"


def _owner_path(name: str) -> str:
    """The layer a parameter belongs to: ``conv.parametrizations.weight.original0`` -> ``conv``; ``fc.weight`` ->
    ``fc``."""
    path = name.rpartition(".")[0]
    return path.split(".parametrizations.")[0] if ".parametrizations." in f".{path}." else path


def _in_mha(model: nn.Module, path: str) -> bool:
    parts = path.split(".") if path else []
    return any(isinstance(model.get_submodule(".".join(parts[:i])), nn.MultiheadAttention)
               for i in range(len(parts) + 1))


# (applies(model, owner path, owner module, parameter, untraced paths), reason): the first that applies is given
REASONS: List[Tuple[Callable, object]] = [
    (lambda model, path, owner, p, untraced: is_parametrized(owner), PARAMETRIZED),
    (lambda model, path, owner, p, untraced: _in_mha(model, path), _MHA),
    (lambda model, path, owner, p, untraced: float_reason(owner) is not None, float_reason),
    (lambda model, path, owner, p, untraced: p.dim() == 3 and "expert" in path.lower(), _EXPERTS),
    (lambda model, path, owner, p, untraced: path in untraced, _UNTRACED),
]


def _reason(model: nn.Module, path: str, owner: nn.Module, p, untraced: Set[str]) -> str:
    for applies, reason in REASONS:
        if applies(model, path, owner, p, untraced):
            return reason(owner) if callable(reason) else reason
    return _OTHER


def _skip(module: nn.Module) -> bool:
    """Embedding tables (lookups, not matmuls) and bitlab_fx's own modules (quantizer steps)."""
    return isinstance(module, nn.Embedding) or type(module).__module__.startswith("bitlab_fx")


def float_weights(model: nn.Module, covered: Set[str], untraced: Optional[Set[str]] = None,
                  covered_modules: Set[str] = frozenset(),
                  known: Optional[Dict[str, str]] = None) -> Dict[str, Tuple[List[int], str]]:
    """``{parameter name: (shape, reason)}`` for parameters of >= 2 dims that are neither in ``covered`` (names of
    weights in the summary's rows) nor under a module of ``covered_modules`` (float rows); ``known``: layers already
    left float with a reason (a graph's skipped calls), whose weights get that reason."""
    found = {}
    untraced = untraced or set()
    for path, module in model.named_modules():
        if _skip(module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            name = f"{path}.{pname}" if path else pname
            owner_path = _owner_path(name)
            if p.dim() < 2 or name in covered or owner_path in covered_modules or any(
                    owner_path.startswith(f"{m}.") for m in covered_modules):
                continue
            owner = model.get_submodule(owner_path)
            why = (known or {}).get(owner_path) or _reason(model, owner_path, owner, p, untraced)
            found[name] = (list(p.shape), why)
    return found
