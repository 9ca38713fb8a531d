"""Output quantizers on any module or function (Brevitas' ``QuantReLU``/``QuantIdentity``). Which quantizer
already feeds a layer through scale-preserving ops: ``input_scale``.

``set_object_type(nn.ReLU, QuantConfig(output=IntActivation(4, signed=False, dynamic=False, granularity="per_tensor")))``
puts ``call_module[relu1_output_fq]`` after every ReLU::

    relu1          = call_module[relu1](conv1)
    relu1_output_fq = call_module[relu1_output_fq](relu1)

Which rules reach a non-layer node (a node that is not a linear/conv layer):

- ``set_module_name``/``set_module_name_regex`` rules (modules only, by fqn) and ``set_object_type`` rules,
  highest priority first; the first one that sets ``output`` (or is ``None``: keep float) decides.
- Never the global rule: ``set_global(cfg)`` quantizes layers; it does not put a quantizer after every op.
- ReLU spellings are one type: a rule for ``nn.ReLU``, ``F.relu`` or ``torch.relu`` matches all of them
  and ``x.relu()``, so a mapping does not depend on how the model's forward happens to write its ReLUs.
- A ``set_object_type`` rule for a non-layer type must set ``output``: it has nothing else to quantize.
"""
from __future__ import annotations

import operator
from typing import Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.embedding import FakeQuantEmbedding
from ..nn.experts import FakeQuantExperts
from ..errors import ConfigError
from ..mapping import QConfigMapping, Rule, _qualname
from ..quant.fake_quant import FAKE_QUANT_TYPES, ActivationFakeQuant
from ._common import META, MODULES, unique_name

RELU_FAMILY = (nn.ReLU, F.relu, torch.relu, F.relu_, torch.relu_, "relu", "relu_")


def _node_types(gm: fx.GraphModule, node: fx.Node) -> Optional[Tuple[Optional[str], tuple]]:
    """``(fqn, object types)`` a non-layer node is matched by; None for nodes that never take an output quantizer."""
    if META in node.meta:
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        # prepared embeddings and experts: swapped by passes.embeddings / passes.experts
        if isinstance(module, FAKE_QUANT_TYPES + tuple(MODULES) + (FakeQuantEmbedding, FakeQuantExperts)):
            return None
        key = type(module)
        fqn = node.target
    elif node.op == "call_function" and node.target is not operator.getitem:
        key, fqn = node.target, None
    elif node.op == "call_method":
        key, fqn = node.target, None
    else:
        return None
    is_relu = any(key is t or (isinstance(key, type) and isinstance(t, type) and issubclass(key, t)) or key == t
                  for t in RELU_FAMILY) or getattr(key, "_opname", None) in ("relu", "relu_")  # aten.relu (export)
    return fqn, ((key,) + RELU_FAMILY if is_relu else (key,))


def _output_rule(mapping: QConfigMapping, node: fx.Node, fqn: Optional[str], types: tuple) -> Optional[Rule]:
    """The rule that decides this node's output quantizer (its config is None when the rule keeps it float),
    or None when no rule does."""
    for rule in mapping.matching_rules(fqn, types):
        if rule.config is None:
            return rule  # explicitly kept float: the rule is used
        if rule.config.output is not None:
            return rule
        if rule.kind in ("object_type", "module_name"):
            what = fqn or f"{node.op} {getattr(node.target, '__name__', node.target)!r}"
            weighted = any(isinstance(t, type) and issubclass(t, (nn.modules.conv._ConvNd, nn.Linear)) for t in types)
            kind = ("a layer type bitlab_fx cannot quantize (supported: nn.Linear, nn.Conv1d, nn.Conv2d and their "
                    "functional forms)" if weighted else "not a linear/conv layer")
            raise ConfigError(f"{what} matched rule {rule} with {rule.config.describe()}, but it is {kind}: only "
                              f"output quantization applies to it; use QuantConfig(output=IntActivation(...)) "
                              f"for {_qualname(rule.key) if rule.kind == 'object_type' else repr(rule.key)}, or "
                              "keep it float")
    return None


def reroute_through(gm: fx.GraphModule, node: fx.Node, module: nn.Module, base: str) -> fx.Node:
    """Insert ``call_module[name](node)`` right after ``node`` and route every other use of ``node`` through it."""
    users = list(node.users)
    name = unique_name(gm, base)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        q = gm.graph.call_module(name, (node,))
    for user in users:
        user.replace_input_with(node, q)
    return q


def insert_output_quant(gm: fx.GraphModule, mapping: QConfigMapping, used: Set[Rule]) -> None:
    """Put an activation fake quantizer after every non-layer node a rule with ``output=`` matches."""
    for node in list(gm.graph.nodes):
        found = _node_types(gm, node)
        if found is None:
            continue
        fqn, types = found
        rule = _output_rule(mapping, node, fqn, types)
        if rule is None:
            continue
        used.add(rule)
        if rule.config is None:
            continue
        fq = ActivationFakeQuant(rule.config.output, token_dims=1, layer=fqn or node.name, rule=str(rule))
        reroute_through(gm, node, fq, f"{fqn or node.name}_output_fq")
