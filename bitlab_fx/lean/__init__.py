"""The lean decode path of ``bfx.greedy_decode``: converted Llama/Mistral/Qwen2 causal LMs decoded from their
converted layers directly (``plan.py`` says what runs and what is refused, ``engine.py`` runs it).

>>> import bitlab_fx as bfx, torch
>>> bfx.lean_fallback_reason(torch.nn.Linear(2, 2))
"Linear is not one of the lean decoder's architectures (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..decode import default_stance
from .compiled import compiled_step
from .engine import LeanDecoder, cache_length
from .plan import LeanUnsupported, Plan, make_plan, model_tensors

__all__ = ["LeanDecoder", "LeanUnsupported", "lean_decoder", "lean_fallback_reason", "lean_greedy"]


def _plan(model: nn.Module) -> Union[Plan, str]:
    """The model's plan, or the reason it has none; kept on the model until its tensors change (``.to()``,
    replaced modules or weights)."""
    tensors = model_tensors(model)
    kept = model.__dict__.get("_bitlab_lean_plan")
    if kept is not None and kept[0] == tensors:
        return kept[1]
    try:
        plan: Union[Plan, str] = make_plan(model)
    except LeanUnsupported as e:
        plan = str(e)
    model.__dict__["_bitlab_lean_plan"] = (tensors, plan)
    model.__dict__.pop("_bitlab_lean_decoder", None)
    return plan


def _call_reason(plan: Plan, batch: int, length: Optional[int]) -> Optional[str]:
    if batch != 1:
        return f"a batch of {batch} rows (the lean decoder decodes one sequence at a time)"
    if length is not None and plan.sliding_window is not None and length > plan.sliding_window:
        return (f"{length} positions exceed the sliding window of {plan.sliding_window} (the lean decoder attends "
                "to the whole prefix)")
    return None


def lean_fallback_reason(model: nn.Module, batch: int = 1, length: Optional[int] = None) -> Optional[str]:
    """None when ``bfx.greedy_decode`` decodes ``model`` (``batch`` rows, prompt plus new tokens ``length``
    positions) with the lean engine; otherwise why it uses the model's own forward instead."""
    plan = _plan(model)
    return plan if isinstance(plan, str) else _call_reason(plan, batch, length)


def lean_decoder(model: nn.Module, length: int) -> Tuple[Optional[LeanDecoder], Optional[str]]:
    """(a lean decoder of ``model`` with a cache of at least ``length`` positions, None) or (None, the reason);
    one decoder is kept on the model and reused by calls that fit its cache."""
    plan = _plan(model)
    if isinstance(plan, str):
        return None, plan
    kept = model.__dict__.get("_bitlab_lean_decoder")
    if kept is not None and kept.plan is plan and kept.max_len >= length:
        return kept, None
    decoder = LeanDecoder(plan, cache_length(length))
    model.__dict__["_bitlab_lean_decoder"] = decoder
    return decoder, None


def lean_greedy(decoder: LeanDecoder, input_ids: torch.Tensor, max_new_tokens: int,
                eos_token_id: Optional[int], compiled: bool = False) -> torch.Tensor:
    """Greedy tokens of one ``[1, length]`` prompt: the prompt in one step, then one step per token (``compiled``:
    the compiled step of ``compiled.py``; after its first call only what tells its graphs apart is checked, as
    ``greedy_decode`` does for a compiled forward: between steps only token values and positions change)."""
    length = input_ids.shape[1]
    out = torch.empty(1, length + max_new_tokens, dtype=torch.long)
    out[:, :length] = input_ids
    row = out[0]
    step = compiled_step(decoder) if compiled else decoder.forward
    logits = decoder.forward(row[:length], 0)
    with contextlib.ExitStack() as later_steps:
        for i in range(max_new_tokens):
            token = logits.argmax()
            row[length + i] = token
            if eos_token_id is not None and int(token) == eos_token_id:
                return out[:, :length + i + 1]
            if i + 1 < max_new_tokens:
                logits = step(row[length + i:length + i + 1], length + i)
                if i == 0 and compiled and default_stance():
                    later_steps.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
    return out
