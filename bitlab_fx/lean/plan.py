"""What the lean decoder runs for a converted Hugging Face Llama-family causal LM, or why it cannot.

:func:`make_plan` walks the model once and collects, per decoder layer, the RMSNorm weights and the prepared
op calls of its converted projections: q/k/v as one call and gate/up as one call where ``convert`` fused them
(:class:`~bitlab_fx.nn.fused.FusedLinears`), o and down as one call each. Anything the lean step would compute
differently from the model's own code raises :class:`LeanUnsupported` with the reason (greedy_decode then
decodes through the model's forward instead): an architecture not in :data:`ARCHITECTURES`, a rotary type
whose frequencies change with the sequence length, a layer left float, a module replaced by other code.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.fused import FusedLinears
from ..nn.quantized import QuantizedLinear
from ..passes._common import stage_of


class LeanUnsupported(Exception):
    """The lean decoder does not run this model (the message says why); greedy_decode falls back to HF's forward."""


# model class -> (decoder layer, attention, MLP, RMSNorm, rotary embedding) class names it must be built of
ARCHITECTURES: Dict[str, Tuple[str, ...]] = {
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm", "LlamaRotaryEmbedding"),
    "MistralForCausalLM": ("MistralDecoderLayer", "MistralAttention", "MistralMLP", "MistralRMSNorm",
                           "MistralRotaryEmbedding"),
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm", "Qwen2RotaryEmbedding"),
}
# rotary types whose cos/sin depend on the position alone (dynamic NTK and longrope rescale with the length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")
# hidden_act -> the function HF's ACT2FN module computes (called directly: a module call costs ~10 us more)
ACTIVATIONS: Dict[str, Callable] = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu}
_LINEAR_OPS = {"ternary_linear", "int8_linear", "int4_linear"}
_MLP_GRAPH_FUNCTIONS = {torch.narrow, operator.mul, F.silu, F.relu, F.gelu}


@dataclass
class LayerPlan:
    """One decoder layer: norm weights and eps, and the prepared calls ``call(x2d) -> y2d``."""
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Callable      # -> [n, (heads + 2 * kv_heads) * head_dim]: q | k | v
    o: Callable
    gate_up: Callable  # -> [n, 2 * intermediate]: gate | up
    down: Callable


@dataclass
class Plan:
    layers: List[LayerPlan]
    eps: float
    final_norm: torch.Tensor
    embed: nn.Module
    head: Callable
    rotary: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    scaling: float
    act: Callable
    sliding_window: Optional[int]
    tensors: Tuple[int, ...]  # data pointers of the model's parameters and buffers when planned (stale check)


def model_tensors(model: nn.Module) -> Tuple[int, ...]:
    """Where the model's parameters and buffers live now: a plan made for other tensors is stale."""
    return tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())


def make_plan(model: nn.Module) -> Plan:
    """The lean plan of ``model`` (a converted LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM), or
    :class:`LeanUnsupported` saying why not."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise LeanUnsupported(f"{name} is not one of the lean decoder's architectures ({', '.join(ARCHITECTURES)})")
    if stage_of(model) != "converted":
        raise LeanUnsupported(f"the {name} is not converted (bfx.convert(prepared.eval()) first)")
    layer_cls, attn_cls, mlp_cls, norm_cls, rope_cls = ARCHITECTURES[name]
    config, inner = model.config, getattr(model, "model", None)
    _expect(inner is not None and getattr(inner, "layers", None) is not None, f"{name} has no model.layers")
    _expect(all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()),
            "the model is not float32 on CPU (the lean decoder runs fp32 models on CPU)")
    _expect(_is(inner.norm, norm_cls) and _is(inner.rotary_emb, rope_cls), "model.norm or model.rotary_emb was replaced")
    rope_type = getattr(inner.rotary_emb, "rope_type", None)
    _expect(rope_type in STATIC_ROPE_TYPES, f"rotary type {rope_type!r} changes its frequencies with the sequence "
                                            f"length; the lean decoder takes {', '.join(STATIC_ROPE_TYPES)}")
    act = ACTIVATIONS.get(getattr(config, "hidden_act", None))
    _expect(act is not None, f"hidden_act {getattr(config, 'hidden_act', None)!r} is not one of {', '.join(ACTIVATIONS)}")
    linears = {m.name: m for m in model.modules() if isinstance(m, QuantizedLinear)}
    fused = [m for m in model.modules() if isinstance(m, FusedLinears)]
    layers, windows = [], set()
    for i, layer in enumerate(inner.layers):
        _expect(_is(layer, layer_cls) and _is(layer.self_attn, attn_cls), f"layer {i} is not a {layer_cls} with a "
                                                                          f"{attn_cls} (replaced or traced)")
        _expect(_is(layer.input_layernorm, norm_cls) and _is(layer.post_attention_layernorm, norm_cls),
                f"layer {i}'s norms are not {norm_cls}")
        prefix = f"model.layers.{i}."
        attn_names = [prefix + "self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mlp_names = [prefix + "mlp." + p for p in ("gate_proj", "up_proj", "down_proj")]
        q, k, v, o = (_converted(model, linears, n) for n in attn_names)
        gate, up, down = (_converted(model, linears, n) for n in mlp_names)
        _check_mlp(layer.mlp, mlp_cls, i)
        windows.add(_sliding_window(layer.self_attn, config))
        layers.append(LayerPlan(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                _joint_call([q, k, v], fused), _call(o), _joint_call([gate, up], fused), _call(down)))
    attn = inner.layers[0].self_attn
    eps = {float(n.variance_epsilon) for layer in inner.layers for n in (layer.input_layernorm,
                                                                        layer.post_attention_layernorm)}
    _expect(eps == {float(inner.norm.variance_epsilon)}, "the RMSNorms have different eps")
    _expect(len(windows) == 1, "layers have different sliding windows")
    return Plan(layers, eps.pop(), inner.norm.weight, inner.embed_tokens, _head(model, linears), inner.rotary_emb,
                config.num_attention_heads, config.num_key_value_heads, attn.head_dim, config.intermediate_size,
                float(attn.scaling), act, windows.pop(), model_tensors(model))


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise LeanUnsupported(reason)


def _is(module: nn.Module, class_name: str) -> bool:
    """``module`` is HF's class of that name, with its own forward (not patched on the instance)."""
    return type(module).__name__ == class_name and "forward" not in module.__dict__


def _check_mlp(mlp: nn.Module, class_name: str, index: int) -> None:
    """An eager HF MLP, or the graph ``convert`` traced from one: linear ops, narrow/contiguous, activation, mul."""
    if _is(mlp, class_name):
        return
    graph = getattr(mlp, "graph", None)
    _expect(graph is not None, f"layer {index}'s mlp is a {type(mlp).__name__}, not a {class_name}")
    for node in graph.nodes:
        target = node.target
        ok = (node.op in ("placeholder", "output", "get_attr")
              or (node.op == "call_method" and target == "contiguous")
              or (node.op == "call_function" and (target in _MLP_GRAPH_FUNCTIONS
                                                  or getattr(target, "_opname", None) in _LINEAR_OPS)))
        _expect(ok, f"layer {index}'s converted mlp graph computes more than its linears and activation "
                    f"({node.op} {target})")


def _sliding_window(attn: nn.Module, config) -> Optional[int]:
    """The attention's window in positions (a key is seen when ``query - key < window``), or None."""
    if type(attn).__name__.startswith("Qwen2"):
        return getattr(attn, "sliding_window", None)
    return getattr(config, "sliding_window", None) if type(attn).__name__.startswith("Mistral") else None


def _converted(model: nn.Module, linears: Dict[str, QuantizedLinear], name: str) -> QuantizedLinear:
    """The converted layer of the model's linear ``name``: at that path, or the one op of the graph there."""
    layer = linears.get(name)
    _expect(layer is not None, f"{name} is not a converted layer (left float or excluded by the mapping)")
    at = model.get_submodule(name)
    if at is not layer:
        calls = [n for n in getattr(at, "graph", torch.fx.Graph()).nodes if n.op.startswith("call_")]
        _expect(len(calls) == 1 and getattr(calls[0].target, "_opname", None) in _LINEAR_OPS,
                f"{name} is a {type(at).__name__} that computes more than its converted linear")
    return layer


def _call(layer: QuantizedLinear) -> Callable:
    """``layer``'s op on a 2-D input, its arguments prepared once (the layer's own op call)."""
    op, args, kwargs = layer.op_call(None)
    rest = args[1:]
    if kwargs:
        return lambda x: op(x, *rest, **kwargs)
    return lambda x: op(x, *rest)


def _joint_call(members: Sequence[QuantizedLinear], groups: List[FusedLinears]) -> Callable:
    """One op call over ``members``' rows where convert fused them (consecutive members of one group), else their
    own calls with the outputs concatenated."""
    for group in groups:
        ids = [next((j for j, m in enumerate(group.members) if m is layer), None) for layer in members]
        if None not in ids and ids == list(range(ids[0], ids[0] + len(ids))):
            op, rest, _, _ = group._prepare_rows(ids[0], ids[-1])
            return lambda x: op(x, *rest)
    calls = [_call(m) for m in members]
    return lambda x: torch.cat([c(x) for c in calls], dim=-1)


def _head(model: nn.Module, linears: Dict[str, QuantizedLinear]) -> Callable:
    """The LM head: its converted layer's op, or the module itself (a float head, a tied float embedding)."""
    head = linears.get("lm_head")
    return model.lm_head if head is None else _call(head)
