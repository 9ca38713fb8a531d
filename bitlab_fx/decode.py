"""Compiled decoding of a converted Hugging Face causal LM: ``bfx.compile_for_decode(model)``.

Eager decoding spends most of a token in the model's Python code (norms, rotary embeddings, attention
glue, the KV cache, ``generate``), not in the packed kernels. Compiling the forward with a static KV cache
(fixed shapes, so one graph for every decode step) turns that glue into a few fused kernels; the
``torch.ops.bitlab`` calls stay as they are. Outputs equal the eager converted model's.

    cm = bfx.compile_for_decode(bfx.convert(prepared.eval()))
    cm.generate(ids, max_new_tokens=64, do_sample=False)      # the first calls compile, the rest reuse

Where compiling fails (no C++ compiler for inductor, an unsupported model), the first call warns with the
reason and the model decodes eagerly from then on.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .errors import ConvertError
from .passes._common import stage_of


def compile_for_decode(model: nn.Module, *, backend: Union[str, Callable] = "inductor", fullgraph: bool = False,
                       options: Optional[dict] = None) -> nn.Module:
    """Set ``model`` (a converted HF causal LM) to decode with a static KV cache and a compiled forward; returns it.

    ``generate()`` then uses the static cache (``generation_config.cache_implementation = "static"``) and the
    compiled forward; ``backend``/``fullgraph``/``options`` go to ``torch.compile``. Call ``model.generate``
    as usual; the first calls compile (prefill and decode shapes), later ones reuse the graphs. The compiled
    forward is an attribute of the model: save the converted model with ``bfx.save_quantized`` (its state), not
    by pickling the compiled one."""
    if stage_of(model) != "converted":
        raise ConvertError(f"compile_for_decode: the {type(model).__name__} is not a converted bitlab_fx model; "
                           "call bfx.convert(prepared.eval()) first (compile a float model with torch.compile)")
    config = getattr(model, "generation_config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        raise ConvertError(f"compile_for_decode: {type(model).__name__} has no Hugging Face generate(); it is for "
                           "causal LMs. Compile other converted models with torch.compile(model)")
    if getattr(model.forward, "_bitlab_compiled", False):
        return model
    bound = model.forward
    if getattr(bound, "__self__", None) is not model:
        raise ConvertError(f"compile_for_decode: {type(model).__name__}.forward is not its own method (hooked by "
                           "another library?); compile it with torch.compile(model.forward) instead")
    config.cache_implementation = "static"
    eager = bound.__func__
    # one compiled function for prompts and one for single-token decode steps: each keeps only its own graphs, so
    # a decode step's guards never have to tell it apart from the prompt graphs (greedy_decode relies on that)
    compiled = {kind: torch.compile(_own_copy(eager), backend=backend, fullgraph=fullgraph, dynamic=False,
                                    options=options) for kind in ("prompt", "step")}
    # bound as a method: a deepcopy of the model rebinds it to the copy (a closure over ``model`` would not)
    model.forward = types.MethodType(_with_eager_fallback(compiled, eager, type(model).__name__), model)
    return model


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: torch.compile keeps its graphs on the code object, which every model
    of the class shares, so a copy keeps this model's graphs (and backend) to itself."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(own, fn)


def _is_decode_step(args: tuple, kwargs: dict) -> bool:
    """A call on one new token per row (``input_ids`` of shape ``[batch, 1]``), as decoding makes after the prompt."""
    ids = args[0] if args else kwargs.get("input_ids")
    return isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 1


def _with_eager_fallback(compiled: dict, eager: Callable, name: str) -> Callable:
    state = {"failed": False}

    @functools.wraps(eager)
    def forward(self, *args: Any, **kwargs: Any):
        if not state["failed"]:
            try:
                return compiled["step" if _is_decode_step(args, kwargs) else "prompt"](self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001  (any compiler failure: decode eagerly instead)
                if not is_compile_failure(e):
                    raise
                state["failed"] = True
                warnings.warn(f"bitlab_fx.compile_for_decode: compiling {name}.forward failed, decoding eagerly "
                              f"instead ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})",
                              RuntimeWarning, stacklevel=2)
        return eager(self, *args, **kwargs)

    forward._bitlab_compiled = True
    return forward


def is_compile_failure(e: Exception) -> bool:
    """An error of torch.compile itself (dynamo, a backend, inductor), not one of the model on its inputs."""
    module = type(e).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or type(e).__name__ in (
        "BackendCompilerFailed", "InductorError", "Unsupported", "CppCompileError")


ENGINES = ("auto", "lean", "lean-compiled", "hf")


def greedy_decode(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                  eos_token_id: Optional[int] = None, recheck_guards: bool = False, engine: str = "auto") -> torch.Tensor:
    """Greedy decoding without ``generate()``'s per-token machinery: ``input_ids`` followed by up to
    ``max_new_tokens`` tokens (fewer when every row has produced ``eos_token_id``), the tokens
    ``model.generate(input_ids, do_sample=False, max_new_tokens=...)`` gives for unpadded prompts.

    For a Hugging Face causal LM (converted or float, compiled with :func:`compile_for_decode` or not): one
    prefill call on the prompt (last position's logits only), then one call per token on a static KV cache kept
    on the model and reused across calls (so a compiled forward keeps its graphs); no logits processors,
    stopping criteria objects or attention-mask bookkeeping. Rows of a batch must have the same length (no
    padding: use ``generate`` with an attention mask for ragged prompts).

    With a forward compiled by :func:`compile_for_decode`, the first decode step of a call runs torch.compile's
    guard checks; the later steps of the same call only check what tells the compiled graphs apart
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``): between them only token values and positions
    change. Do not change the model (dtype, device, replaced weights) from another thread during a call;
    ``recheck_guards=True`` checks every step.

    ``engine``: ``"auto"`` (default) decodes converted Llama/Mistral/Qwen2 models, one prompt at a time, with the
    lean engine (``bitlab_fx/lean``: the converted layers called directly, its own KV cache; about twice as fast
    as the compiled forward on small models) and every other model with its forward as above; ``"lean"`` does
    the same but warns when it falls back (``bfx.lean_fallback_reason(model)`` says why); ``"lean-compiled"``
    also compiles the lean engine's one-token step with ``torch.compile`` (``bitlab_fx/lean/compiled.py``: the first
    call compiles, later calls with the same model reuse the graph; where compiling fails it warns and runs the
    eager lean step); ``"hf"`` always calls the model's forward."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ConvertError(f"greedy_decode: input_ids must be a [batch, length] int64 tensor, got "
                           f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} of shape "
                           f"{tuple(getattr(input_ids, 'shape', ()))}")
    if not callable(getattr(model, "generate", None)) or getattr(model, "config", None) is None:
        raise ConvertError(f"greedy_decode: {type(model).__name__} is not a Hugging Face causal LM (no config/"
                           "generate); call the model yourself")
    if max_new_tokens < 1:
        raise ConvertError(f"greedy_decode: max_new_tokens={max_new_tokens}; ask for at least one token")
    batch, length = input_ids.shape
    if engine not in ENGINES:
        raise ConvertError(f"greedy_decode: engine={engine!r}; use one of {', '.join(map(repr, ENGINES))}")
    if engine != "hf":
        out = _lean_greedy(model, input_ids, max_new_tokens, eos_token_id, warn=engine.startswith("lean"),
                           compiled=engine == "lean-compiled")
        if out is not None:
            return out
    out = torch.empty(batch, length + max_new_tokens, dtype=torch.long, device=input_ids.device)
    out[:, :length] = input_ids
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    compiled = getattr(getattr(model, "forward", None), "_bitlab_compiled", False)
    # (the cache's tensors are inference tensors: reset them in inference mode too)
    with torch.inference_mode(), contextlib.ExitStack() as later_steps:
        cache = {_cache_kwarg(model): _static_cache(model, batch, length + max_new_tokens)}
        logits = model(input_ids, **cache, use_cache=True, logits_to_keep=1,
                       cache_position=torch.arange(length, device=input_ids.device)).logits
        for i in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            out[:, length + i] = token
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    return out[:, :length + i + 1]
            if i + 1 < max_new_tokens:
                position = torch.full((1,), length + i, dtype=torch.long, device=input_ids.device)
                logits = model(token[:, None], **cache, use_cache=True, cache_position=position).logits
                if i == 0 and compiled and not recheck_guards and default_stance():
                    # the first step ran torch.compile's guards and found (or compiled) the decode graph; the later
                    # steps of this call pass the same model, cache object, shapes, dtypes and modes (only token
                    # values and positions change), so checking only what tells the graphs apart is enough
                    later_steps.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
    return out


def _lean_greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: Optional[int],
                 warn: bool, compiled: bool) -> Optional[torch.Tensor]:
    """The lean engine's tokens, or None where it does not run the model (with a warning if ``warn``)."""
    from .lean import lean_decoder, lean_fallback_reason, lean_greedy

    batch, length = input_ids.shape
    with torch.inference_mode():
        reason = lean_fallback_reason(model, batch, length + max_new_tokens)
        if reason is None and input_ids.device.type != "cpu":
            reason = f"the input is on {input_ids.device} (the lean engine runs on CPU)"
        if reason is None:
            decoder, reason = lean_decoder(model, length + max_new_tokens)
            if decoder is not None:
                return lean_greedy(decoder, input_ids, max_new_tokens, eos_token_id, compiled)
    if warn:
        warnings.warn(f"bitlab_fx.greedy_decode: the lean engine does not decode this {type(model).__name__}: {reason}; "
                      "decoding with its forward instead", RuntimeWarning, stacklevel=3)
    return None


def default_stance() -> bool:
    """Whether torch.compile runs with its default stance (not one the caller set, e.g. "force_eager"), which
    greedy_decode may then narrow to skipping non-differentiating guards without changing the caller's choice."""
    stance = getattr(getattr(torch._dynamo, "eval_frame", None), "_stance", None)  # (no public getter in torch)
    return getattr(stance, "stance", "default") == "default" and getattr(stance, "backend", None) is None


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    forward = getattr(type(model).forward, "__wrapped__", type(model).forward)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _static_cache(model: nn.Module, batch: int, length: int):
    """A static KV cache for ``batch`` rows of at least ``length`` positions, kept on the model and reset for the
    next call that fits in it (one cache size: the compiled graphs are made once). A new one holds ``length``
    rounded up to a power of two, at least 128: attention reads the whole static cache every token, so a cache
    much longer than the calls costs time (256 positions instead of 128 cost ~8% a token on the synthetic Llama)."""
    import transformers

    size = max(128, 1 << (length - 1).bit_length())
    kept = model.__dict__.get("_bitlab_static_cache")
    if kept is not None and kept[0] == batch and kept[1] >= length:
        kept[2].reset()
        return kept[2]
    cache = transformers.StaticCache(config=model.config, max_cache_len=size)
    model.__dict__["_bitlab_static_cache"] = (batch, size, cache)
    return cache
