"""Mixture-of-experts experts (3-D weights), prepared and converted by module swap, and their summary rows.

Each 3-D weight of a transformers experts module (:func:`~bitlab_fx.nn.experts.follows_experts_contract`) is one
"layer" for the mapping, named by the parameter's path and typed by the experts module's class::

    model.layers.0.mlp.experts.gate_up_proj    (object type: MixtralExperts)
    model.layers.0.mlp.experts.down_proj

so ``set_module_name("model.layers.0.mlp.experts.down_proj", bfx.int8())`` addresses one projection,
``set_module_name("model.layers.0.mlp.experts", None)`` (an ancestor) both, a pattern such as
``r".*experts\\.down_proj"`` every layer's, ``set_object_type(MixtralExperts, cfg)`` every experts module of that
class, and the global rule all of them. ``prepare_experts`` (before capture) swaps each experts module with a
quantized projection for a :class:`~bitlab_fx.nn.experts.FakeQuantExperts`; ``convert_experts`` (after the graphs
are lowered) swaps that for a :class:`~bitlab_fx.nn.experts.QuantizedExperts`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Optional, Set, Tuple

from torch import nn

from ..config import PerGroup
from ..errors import ConfigError
from ..mapping import QConfigMapping, Rule
from ..nn.experts import (FakeQuantExperts, QuantizedExperts, QuantizedGroupedLinear, dynamic_activation,
                          follows_experts_contract, projections)
from ..quant import exact_grouped as G
from ..quant import primitives as P
from ..quant.formats import format_of
from ._common import set_submodule
from .lower_activations import _static_multiplier

EXPERT_PARALLEL = "expert-parallel experts (sentinel expert ids) are not supported: left float"


def _qualify(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def float_experts_reason(module: nn.Module) -> Optional[str]:
    """Why a transformers experts module cannot be quantized, or None."""
    return EXPERT_PARALLEL if getattr(module, "_is_expert_parallel", False) else None


def experts_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(path, module)`` of every transformers experts module with 3-D weights (float, prepared or converted)."""
    for path, module in model.named_modules():
        if isinstance(module, (FakeQuantExperts, QuantizedExperts)) or follows_experts_contract(module):
            yield path, module


def _check_config(config, rule: Rule, fqn: str, weight_rows_shape) -> None:
    where = f"experts weight {fqn!r} {list(weight_rows_shape)} (rule {rule})"
    if config.weight is None or config.bias is not None or config.output is not None:
        raise ConfigError(f"{where}: experts take a weight spec and optionally an int8 input (per token, per tensor or "
                          "static); no bias=, output= or input-only configs. Give it e.g. bfx.ternary(), bfx.int8(), "
                          "bfx.weight_only('int4'), or keep it float with None")
    a = config.input
    if a is not None and not (a.bits == 8 and a.signed):
        raise ConfigError(f"{where}: input={a} is not supported for experts (the grouped op quantizes its rows to int8 "
                          "itself); use IntActivation(8) (per_token, per_tensor or static) or no input quantizer")
    g = config.weight.granularity
    if isinstance(g, PerGroup) and weight_rows_shape[2] % g.size:
        raise ConfigError(f"{where}: group size {g.size} does not divide the experts' in_features="
                          f"{weight_rows_shape[2]}; choose a group size that divides it, or use 'per_channel'")


def _resolve(mapping: QConfigMapping, path: str, module: nn.Module):
    """``{projection: (config, rule)}`` of an experts module."""
    return {p: mapping.resolve(_qualify(path, p), type(module)) for p in projections(module)}


def prepare_experts(model: nn.Module, mapping: QConfigMapping) -> Set[Rule]:
    """Swap, in place, each experts module a rule quantizes for a FakeQuantExperts; returns the rules used."""
    used: Set[Rule] = set()
    swaps = []
    for path, module in list(experts_modules(model)):
        if isinstance(module, (FakeQuantExperts, QuantizedExperts)) or float_experts_reason(module):
            continue
        resolved = _resolve(mapping, path, module)
        used.update(rule for _, rule in resolved.values() if rule is not None)
        if all(config is None for config, _ in resolved.values()):
            continue
        for p, (config, rule) in resolved.items():
            if config is not None:
                w = getattr(module, p)
                _check_config(config, rule, _qualify(path, p), w.transpose(1, 2).shape if module.is_transposed else w.shape)
        swaps.append((path, FakeQuantExperts(module, {p: c for p, (c, _) in resolved.items()},
                                             {p: "" if r is None else str(r) for p, (_, r) in resolved.items()},
                                             path)))
    for path, prepared in swaps:
        if path == "":
            raise ConfigError("prepare_qat: the model is a lone experts module; prepare the model that routes to it")
        set_submodule(model, path, prepared)
    return used


def reject_experts_rules(model: nn.Module, mapping: QConfigMapping, where: str) -> None:
    """Raise where a rule quantizes experts in a capture that cannot hold the prepared experts."""
    for path, module in experts_modules(model):
        for p, (config, rule) in _resolve(mapping, path, module).items():
            if config is not None:
                raise ConfigError(f"prepare_qat({where}): rule {rule} quantizes the experts weight "
                                  f"{_qualify(path, p)!r}, which only the fx frontend supports; use frontend='fx' (the "
                                  f"default), or keep the experts float with set_module_name({path!r}, None)")


def _activation(module: FakeQuantExperts, p: str):
    """The grouped op's ``(act, static multiplier)`` of a prepared projection (warns when a static one saw no data)."""
    fq = getattr(module, f"{p}_input_fq", None)
    if fq is None or fq.spec.dynamic:
        return dynamic_activation(fq)
    return "per_tensor", _static_multiplier(fq, f"convert: {fq.layer}")


def convert_experts(model: nn.Module) -> nn.Module:
    """Swap each FakeQuantExperts for a QuantizedExperts, in place."""
    for path, module in list(model.named_modules()):
        if isinstance(module, FakeQuantExperts):
            activations = {p: _activation(module, p) for p in module.weight_names() if module.specs[p] is not None}
            set_submodule(model, path, QuantizedExperts(module, activations))
    return model


def _row(fqn: str, type_name: str, shape, spec, rule: str, params: int, size: int, zeros: str, act: str):
    return {"layer": fqn, "type": f"{type_name} {'x'.join(map(str, shape))}", "weight": "float" if spec is None else
            spec.format, "w_granularity": "" if spec is None else f"{spec.granularity} per expert",
            "activation": act, "input_scale": "", "rule": rule, "params": params, "bytes_fp32": 4 * params,
            "bytes_quant": size, "zeros": zeros}


def _act(input_fq) -> str:
    return "float" if input_fq is None else f"{input_fq.spec.format} {input_fq.spec.granularity}" + (
        "" if input_fq.spec.dynamic else " static")


def _projection_row(path: str, module: nn.Module, p: str, mapping) -> Dict[str, Any]:
    fqn = _qualify(path, p)
    bias = getattr(module, f"{p}_bias", None)
    nb = 0 if bias is None else bias.numel()
    proj = getattr(module, p)
    type_name = getattr(module, "experts_type", type(module).__name__)
    if isinstance(proj, QuantizedGroupedLinear):
        n = proj.weight_shape[0] * proj.weight_shape[1] * proj.weight_shape[2] + nb
        return _row(fqn, type_name, proj.weight_shape, proj.spec, proj.rule, n, proj.packed_bytes(),
                    f"{proj.zero_fraction:.1%}", proj.act if proj.act == "none" else f"int8 {proj.act} (fused)")
    rows = proj.transpose(1, 2) if module.is_transposed else proj
    n = rows.numel() + nb
    wfq = getattr(module, f"{p}_weight_fq", None)
    if wfq is None:  # float: kept by a rule, no rule, or not supported
        rule = module.rules.get(p, "") if isinstance(module, FakeQuantExperts) else (
            "" if mapping is None else str(_resolve(mapping, path, module)[p][1] or ""))
        return _row(fqn, type_name, rows.shape, None, rule, n, 4 * n, "", "float")
    spec = module.specs[p]
    view = G.quantizer_view(rows.detach().float(), spec.granularity)
    wq, _ = P.quantize_weight(view, wfq.spec, wfq.step(view) if spec.learned else None)
    e, n_out, k = rows.shape  # stored per expert row (a per-expert step is one number per expert)
    size = format_of(spec).stored_bytes(e * n_out, k) + 4 * math.prod(P.scale_shape(view.shape, wfq.spec.granularity)) \
        + 4 * nb
    return _row(fqn, type_name, rows.shape, spec, module.rules[p], n, size, f"{(wq == 0).float().mean().item():.1%}",
                _act(getattr(module, f"{p}_input_fq", None)))


def experts_rows(model: nn.Module, mapping: Optional[QConfigMapping]) -> Dict[str, Dict[str, Any]]:
    """Summary rows, one per experts weight (``<experts path>.<projection>``): quantized (prepared: projected bytes;
    converted: measured) or float with the rule that kept it so (``mapping``: the model's qconfig)."""
    return {_qualify(path, p): _projection_row(path, m, p, mapping) for path, m in experts_modules(model)
            for p in projections(m)}


def experts_skipped(model: nn.Module) -> Dict[str, str]:
    """Experts left float for a reason other than a rule (e.g. expert parallelism): path -> why."""
    return {path: why for path, m in experts_modules(model) if (why := float_experts_reason(m))}
