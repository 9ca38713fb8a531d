"""Mixture-of-experts experts with 3-D weights: the prepared (fake-quant) and converted (packed, grouped op) forms.

transformers 5 stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, gpt-oss... as one module per layer
holding 3-D parameters, ``gate_up_proj [E, 2I, H]`` (or ``up_proj``) and ``down_proj [E, H, I]`` (``[E, in, out]``
where ``is_transposed``; optional ``*_bias [E, out]``), whose class is decorated with
``transformers.integrations.moe.use_experts_implementation``: ``forward(hidden_states, top_k_index, top_k_weights)``,
with ``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm`` and ``_apply_gate`` saying what it
computes (:func:`follows_experts_contract`). Both forms here compute what transformers' ``grouped_mm`` experts
forward computes (the routed rows sorted by expert, one grouped projection, the gate, a second grouped projection,
the routing weights, the sum over ``top_k``), each projection quantized per expert:

- :class:`FakeQuantExperts` (``prepare_qat``): the float 3-D parameters stay where they were (same names, an fp32
  ``state_dict`` loads), each projection has its weight (and input) quantizer, ``<proj>_weight_fq`` /
  ``<proj>_input_fq``, and runs :func:`bitlab_fx.quant.exact_grouped.grouped_linear`;
- :class:`QuantizedExperts` (``convert``): each projection is a :class:`QuantizedGroupedLinear` holding the packed
  codes ``[E, N, stored K]`` and steps, run by one ``torch.ops.bitlab.<format>_grouped_linear`` call for all experts.

The model's gate function (``_apply_gate``: SwiGLU, gpt-oss' clamped GLU...), activation and public attributes are
kept, so both forms compute what the model does.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import ConvertError
from ..quant import exact_grouped as G
from ..quant import primitives as P
from ..quant.fake_quant import ActivationFakeQuant, WeightFakeQuant
from ..quant.formats import WeightFormat, format_of
from ..quant.packing import FORMAT_VERSION
from .quantized import apply_keeping_dtype

_CONTRACT = ("has_gate", "has_bias", "is_transposed", "num_experts")


def projections(experts: nn.Module) -> Tuple[str, str]:
    """The names of the two 3-D weights, in call order: ``("gate_up_proj" or "up_proj", "down_proj")``."""
    return ("gate_up_proj" if experts.has_gate else "up_proj"), "down_proj"


def follows_experts_contract(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module (``use_experts_implementation``) with 3-D weights."""
    if not hasattr(type(module), "_apply_gate") or not all(hasattr(module, a) for a in _CONTRACT):
        return False
    return all(isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3
               for p in projections(module))


def dynamic_activation(input_fq: Optional[ActivationFakeQuant]) -> Tuple[str, Optional[torch.Tensor]]:
    """The grouped op's ``(act, static multiplier)`` for a projection's input quantizer: ``"none"`` without one,
    its granularity when dynamic, its current multiplier (per tensor) when static."""
    if input_fq is None:
        return "none", None
    if input_fq.spec.dynamic:
        return input_fq.spec.granularity, None
    return "per_tensor", input_fq.multiplier(torch.empty(0)).detach().float().reshape(1).clone()


class _RoutedExperts(nn.Module):
    """The routed forward both forms share; a subclass says how one projection runs (``project``)."""

    def _take_from(self, experts: nn.Module) -> None:
        for key, value in vars(experts).items():  # num_experts, hidden_dim, has_gate, config, limit, alpha...
            if not key.startswith("_") and key != "training" and not isinstance(value, (torch.Tensor, nn.Module)):
                setattr(self, key, value)
        for name, child in experts.named_children():  # act_fn, post_expert_norm
            self.add_module(name, child)
        self.gate_fn = type(experts)._apply_gate  # the model's gate on the first projection's output
        self.experts_type = type(experts).__name__

    def weight_names(self) -> Tuple[str, str]:
        return projections(self)

    def project(self, name: str, rows: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        tokens, top_k, hidden = hidden_states.shape[0], top_k_index.shape[-1], hidden_states.shape[-1]
        sorted_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
        rows = hidden_states[order // top_k]
        experts = torch.arange(self.num_experts, device=sorted_ids.device)
        group_ends = torch.searchsorted(sorted_ids, experts, right=True)  # where each expert's rows end
        first, down = self.weight_names()
        h = self.project(first, rows, group_ends)
        h = self.gate_fn(self, h) if self.has_gate else self.act_fn(h)
        h = self.project(down, h, group_ends)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        weighted = h * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.shape[0], device=order.device)
        return weighted[back].view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


class FakeQuantExperts(_RoutedExperts):
    """Prepared experts: the float 3-D weights (the same Parameters) and per-projection quantizers.

    ``configs``: each projection's QuantConfig (None: that projection stays float); ``rules``: the rule that chose
    it, as text; ``name``: the experts module's path (quantizers are named ``<path>.<projection>``)."""

    def __init__(self, experts: nn.Module, configs: Dict[str, object], rules: Dict[str, str], name: str = ""):
        super().__init__()
        self._take_from(experts)
        self.name, self.rules = name, dict(rules)
        self.specs = {p: (None if configs.get(p) is None else configs[p].weight) for p in projections(experts)}
        for p in projections(experts):
            setattr(self, p, getattr(experts, p))
            if self.has_bias:
                setattr(self, f"{p}_bias", getattr(experts, f"{p}_bias"))
            cfg = configs.get(p)
            if cfg is None:
                continue
            view = G.quantizer_view(self.weight_rows(p).detach(), cfg.weight.granularity)
            wfq = WeightFakeQuant(G.quantizer_spec(cfg.weight), layer=f"{name}.{p}", rule=rules[p], weight=view)
            wfq.hand_over = True
            setattr(self, f"{p}_weight_fq", wfq)
            if cfg.input is not None:
                afq = ActivationFakeQuant(cfg.input, token_dims=1, layer=f"{name}.{p}", rule=rules[p])
                afq.hand_over = True
                setattr(self, f"{p}_input_fq", afq)

    def weight_rows(self, name: str) -> torch.Tensor:
        """The projection's weight as ``[E, N, K]`` (a view of the parameter; transposed where it is stored
        ``[E, in, out]``)."""
        w = getattr(self, name)
        return w.transpose(1, 2) if self.is_transposed else w

    def project(self, name, rows, group_ends):
        return G.grouped_linear(rows, group_ends.tolist(), self.weight_rows(name), getattr(self, f"{name}_bias", None),
                                getattr(self, f"{name}_input_fq", None), getattr(self, f"{name}_weight_fq", None),
                                self.specs[name])

    def extra_repr(self) -> str:
        return f"{self.experts_type}, " + ", ".join(f"{p}={s}" for p, s in self.specs.items())


class QuantizedGroupedLinear(nn.Module):
    """One converted experts projection: packed codes ``[E, N, stored K]``, fp32 steps ``weight_scale`` (``[E, N]``,
    ``[E, N, G]`` or ``[E, 1]``), an optional float ``bias [E, N]`` and static ``act_multiplier``.
    ``forward(rows, group_ends)`` is one ``torch.ops.bitlab.<format>_grouped_linear`` call."""

    def __init__(self, spec, codes: torch.Tensor, steps: torch.Tensor, bias: Optional[torch.Tensor], act: str,
                 act_multiplier: Optional[torch.Tensor], name: str = "", rule: str = ""):
        super().__init__()
        self.spec, self.act, self.name, self.rule = spec, act, name, rule
        self.weight_format = format_of(spec).name
        self.weight_shape = tuple(codes.shape)  # [E, N, K]
        e, n, k = self.weight_shape
        self.zero_fraction = float((codes == 0).float().mean()) if codes.numel() else 0.0
        self.register_buffer(self.format.buffer, self.format.store(codes.reshape(e * n, k)).reshape(e, n, -1))
        self.register_buffer("weight_scale", steps.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("act_multiplier", act_multiplier)
        self._op = self.format.op("grouped_linear")

    @classmethod
    def from_prepared(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], spec, weight_fq: WeightFakeQuant,
                      activation: Tuple[str, Optional[torch.Tensor]], name: str = "", rule: str = ""):
        """Pack a prepared projection (``weight [E, N, K]``) with its weight quantizer's steps; ``activation``: the
        op's ``(act, static multiplier)`` (``("none", None)`` weight-only)."""
        w = weight.detach().float()
        if not torch.isfinite(w).all():
            raise ConvertError(f"experts {name!r}: the weight has NaN/inf values and cannot be quantized; fix or reload "
                               "the weights, or keep these experts float (set_module_name(name, None))")
        view = G.quantizer_view(w, spec.granularity)
        wq, step = P.quantize_weight(view, weight_fq.spec, weight_fq.step(view) if spec.learned else None)
        e, n, k = w.shape
        return cls(spec, wq.reshape(e, n, k), G.expert_steps(step, e, n), bias, *activation, name, rule)

    @property
    def format(self) -> WeightFormat:
        return format_of(self.spec)

    def int_weight(self) -> torch.Tensor:
        """The integer codes as int8 ``[E, N, K]`` (for inspection and tests)."""
        e, n, k = self.weight_shape
        stored = self._buffers[self.format.buffer]
        return self.format.load(stored.reshape(e * n, -1), k).reshape(e, n, k)

    def forward(self, rows: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        b = self._buffers
        return self._op(rows, group_ends, b[self.format.buffer], b["weight_scale"], b["bias"], self.act,
                        act_multiplier=b["act_multiplier"], in_features=self.weight_shape[2])

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def __getstate__(self):  # the op overload itself does not pickle: looked up again on load
        state = self.__dict__.copy()
        state.pop("_op", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._op = self.format.op("grouped_linear")

    def get_extra_state(self):
        return {"format_version": FORMAT_VERSION, "weight_format": self.weight_format,
                "weight_shape": list(self.weight_shape), "act": self.act}

    def set_extra_state(self, state):
        mine = self.get_extra_state()
        if state != mine:
            raise ConvertError(f"experts {self.name!r}: saved {state} does not match these experts ({mine}); load a "
                               "file converted from the same model with the same qconfig and this bitlab_fx")

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, fn, recurse, ["weight_scale", "act_multiplier"])

    def extra_repr(self) -> str:
        return (f"{'x'.join(map(str, self.weight_shape))}, weight={self.weight_format}({self.spec.granularity}), "
                f"act={self.act}, {math.prod(self.weight_shape):,} codes")


class QuantizedExperts(_RoutedExperts):
    """Converted experts: each quantized projection a :class:`QuantizedGroupedLinear` at the projection's name
    (``experts.gate_up_proj.packed_weight``...); a projection a rule kept float stays the float Parameter.
    ``activations``: each quantized projection's ``(act, static multiplier)`` (default: from its input quantizer,
    ``passes.experts`` gives the frozen static multipliers)."""

    def __init__(self, prepared: FakeQuantExperts, activations: Optional[Dict[str, tuple]] = None):
        super().__init__()
        for key, value in vars(prepared).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for name, child in prepared.named_children():
            if not isinstance(child, (WeightFakeQuant, ActivationFakeQuant)):
                self.add_module(name, child)
        for p in prepared.weight_names():
            bias = getattr(prepared, f"{p}_bias", None)
            wfq = getattr(prepared, f"{p}_weight_fq", None)
            if wfq is None:  # float: the parameters stay as they are
                setattr(self, p, getattr(prepared, p))
                if bias is not None:
                    setattr(self, f"{p}_bias", bias)
                continue
            activation = (activations or {}).get(p) or dynamic_activation(getattr(prepared, f"{p}_input_fq", None))
            setattr(self, p, QuantizedGroupedLinear.from_prepared(
                prepared.weight_rows(p), bias, prepared.specs[p], wfq, activation, f"{prepared.name}.{p}",
                prepared.rules[p]))

    def project(self, name, rows, group_ends):
        proj = getattr(self, name)
        if isinstance(proj, QuantizedGroupedLinear):
            return proj(rows, group_ends)
        w = proj.transpose(1, 2) if self.is_transposed else proj
        return G.grouped_linear(rows, group_ends.tolist(), w, getattr(self, f"{name}_bias", None), None, None, None)

    def extra_repr(self) -> str:
        return self.experts_type
