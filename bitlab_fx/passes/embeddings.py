"""Embeddings, prepared and converted by module swap (no graph rewrite: a lookup has no activation to quantize).

``prepare_embeddings`` (before capture) puts a :class:`~bitlab_fx.nn.embedding.FakeQuantEmbedding` where a
rule names an ``nn.Embedding`` explicitly: ``set_object_type(nn.Embedding, cfg)``, ``set_module_name`` of
the embedding itself, or a matching ``set_module_name_regex``. The global default and rules of ancestors
never quantize an embedding (they are written for the matmul layers). The config must be weight-only.

``convert_embeddings`` (after the graphs are lowered) puts a
:class:`~bitlab_fx.nn.embedding.QuantizedEmbedding` in its place. A weight tied to a converted linear layer
(an LM head sharing the token embedding) with the same weight spec is stored once: the embedding reads the
head's packed codes and steps.
"""
from __future__ import annotations

from typing import Any, Dict, Set

import torch
from torch import nn

from ..errors import ConfigError
from ..mapping import QConfigMapping, Rule
from ..nn.embedding import FakeQuantEmbedding, QuantizedEmbedding
from ..nn.quantized import QuantizedLinear
from ..passes._common import set_submodule
from ..quant import primitives as P
from ..quant.formats import converted_weight_bytes


def _check_config(config, rule: Rule, fqn: str, embedding: nn.Embedding) -> None:
    where = f"embedding {fqn!r} (rule {rule})"
    if config.weight is None or config.input is not None or config.output is not None or config.bias is not None:
        raise ConfigError(f"{where}: an embedding looks up rows of its weight, it has no activation or bias to "
                          "quantize; give it a weight-only config, e.g. bfx.weight_only(bfx.IntWeight(8)) "
                          "(int8 rows), bfx.weight_only(bfx.IntWeight(4, granularity='per_group:32'))")
    if embedding.max_norm is not None:
        raise ConfigError(f"{where}: nn.Embedding(max_norm=...) renormalizes its rows in place on every lookup, "
                          "which packed codes cannot do; remove max_norm or leave this embedding float")


def _plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding``, or a subclass that keeps its forward (a lookup of ``weight`` rows)."""
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward


def prepare_embeddings(model: nn.Module, mapping: QConfigMapping) -> Set[Rule]:
    """Swap each embedding a rule names for a FakeQuantEmbedding, in place; returns the rules used."""
    used: Set[Rule] = set()
    swaps = []
    for fqn, module in model.named_modules():
        if not _plain_embedding(module):
            continue
        config, rule = mapping.resolve_explicit(fqn, nn.Embedding)
        if rule is None:
            continue
        used.add(rule)
        if config is None:
            continue
        _check_config(config, rule, fqn, module)
        swaps.append((fqn, FakeQuantEmbedding(module, config.weight, fqn, str(rule))))
    for fqn, fq in swaps:
        if fqn == "":
            raise ConfigError("prepare_qat: the model is a lone nn.Embedding; quantize it with "
                              "bfx.QuantizedEmbedding.from_float(embedding, spec)")
        set_submodule(model, fqn, fq)
    return used


def reject_embedding_rules(model: nn.Module, mapping: QConfigMapping, where: str) -> None:
    """Raise where a rule quantizes an embedding in a capture that cannot hold the prepared embedding."""
    for fqn, module in model.named_modules():
        config, rule = mapping.resolve_explicit(fqn, nn.Embedding) if _plain_embedding(module) else (None, None)
        if config is not None:
            raise ConfigError(f"prepare_qat({where}): rule {rule} quantizes the embedding {fqn!r}, which only the fx "
                              "frontend supports; use frontend='fx' (the default), or drop the embedding rule")


def convert_embeddings(model: nn.Module) -> nn.Module:
    """Swap each FakeQuantEmbedding for a QuantizedEmbedding, in place (codes shared with a tied linear)."""
    for fqn, module in list(model.named_modules()):
        if isinstance(module, FakeQuantEmbedding):
            q = QuantizedEmbedding.from_float(module, module.spec, module.weight_fq, module.name or fqn, module.rule)
            _share_with_tied_linear(model, q)
            set_submodule(model, fqn, q)
    return model


def _share_with_tied_linear(model: nn.Module, emb: QuantizedEmbedding) -> None:
    """Point ``emb`` at the buffers of a converted linear layer holding the very same codes and steps (a tied LM
    head converted with the same spec), so the table is stored once."""
    buffer = emb.format.buffer
    for layer in model.modules():
        if not isinstance(layer, QuantizedLinear) or layer.weight_shape != emb.weight_shape or layer.spec != emb.spec:
            continue
        mine, theirs = emb._buffers, layer._buffers
        if torch.equal(mine[buffer], theirs[buffer]) and torch.equal(mine["weight_scale"], theirs["weight_scale"]):
            mine[buffer], mine["weight_scale"] = theirs[buffer], theirs["weight_scale"]
            return


def _stored_once_elsewhere(model: nn.Module, fqn: str, m: nn.Module) -> bool:
    """Whether the embedding's table is stored by a quantized linear layer too (tied, same spec): counted there."""
    if isinstance(m, QuantizedEmbedding):
        ptr = m.stored_weight.data_ptr()
        return any(isinstance(x, QuantizedLinear) and x.stored_weight.data_ptr() == ptr for x in model.modules())
    for sub in model.modules():
        fq = getattr(sub, "_weight_fq", None)  # a prepared lone layer holds its weight and quantizer
        if sub is not m and getattr(sub, "weight", None) is m.weight and getattr(fq, "spec", None) == m.spec:
            return True
    return False


def embedding_rows(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Summary rows of the model's quantized embeddings (prepared: projected bytes; converted: measured). A table
    stored once for a tied LM head is counted in the head's row (0 params and bytes here, type "Embedding (tied)")."""
    rows = {}
    for fqn, m in model.named_modules():
        if not isinstance(m, (FakeQuantEmbedding, QuantizedEmbedding)):
            continue
        n = m.num_embeddings * m.embedding_dim
        if isinstance(m, QuantizedEmbedding):
            size, zeros = m.packed_bytes(), m.zero_fraction
        else:
            size = converted_weight_bytes((m.num_embeddings, m.embedding_dim), m.spec)
            zeros = float((P.quantize_weight(m.weight.detach().float(), m.spec)[0] == 0).float().mean())
        tied = _stored_once_elsewhere(model, fqn, m)
        rows[fqn] = {"layer": fqn, "type": "Embedding (tied)" if tied else "Embedding", "weight": m.spec.format,
                     "w_granularity": str(m.spec.granularity), "activation": "(token ids)", "input_scale": "",
                     "rule": m.rule, "params": 0 if tied else n, "bytes_fp32": 0 if tied else 4 * n, "bytes_quant": 0 if tied else size,
                     "zeros": f"{zeros:.1%}"}
    return rows
