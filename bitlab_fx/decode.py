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

import functools
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
    # torch.compile keeps its compiled graphs on the code object, which every model of the class shares: a copy
    # of the function with a code object of its own keeps this model's graphs (and backend) to itself
    own = types.FunctionType(eager.__code__.replace(), eager.__globals__, eager.__name__, eager.__defaults__,
                             eager.__closure__)
    own.__kwdefaults__ = eager.__kwdefaults__
    functools.update_wrapper(own, eager)
    compiled = torch.compile(own, backend=backend, fullgraph=fullgraph, dynamic=False, options=options)
    # bound as a method: a deepcopy of the model rebinds it to the copy (a closure over ``model`` would not)
    model.forward = types.MethodType(_with_eager_fallback(compiled, eager, type(model).__name__), model)
    return model


def _with_eager_fallback(compiled: Callable, eager: Callable, name: str) -> Callable:
    state = {"failed": False}

    @functools.wraps(eager)
    def forward(self, *args: Any, **kwargs: Any):
        if not state["failed"]:
            try:
                return compiled(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001  (any compiler failure: decode eagerly instead)
                if not _is_compile_failure(e):
                    raise
                state["failed"] = True
                warnings.warn(f"bitlab_fx.compile_for_decode: compiling {name}.forward failed, decoding eagerly "
                              f"instead ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})",
                              RuntimeWarning, stacklevel=2)
        return eager(self, *args, **kwargs)

    forward._bitlab_compiled = True
    return forward


def _is_compile_failure(e: Exception) -> bool:
    """An error of torch.compile itself (dynamo, a backend, inductor), not one of the model on its inputs."""
    module = type(e).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or type(e).__name__ in (
        "BackendCompilerFailed", "InductorError", "Unsupported", "CppCompileError")
