"""The compiled lean decode step: ``bfx.greedy_decode(model, ids, n, engine="lean-compiled")``.

The lean engine's one-token step in its fixed-shape form (:meth:`LeanDecoder.step`: attention over the whole
cache with the positions after the token masked out, the position a tensor) compiled once per decoder by
``torch.compile`` (fullgraph, static shapes, inductor's C++ wrapper): the RMSNorms, the rotary embedding, the
cache write, the softmax and the SiLU product become a few fused loops between the ``torch.ops.bitlab`` calls,
and the ~25 Python-level torch calls a layer become one call of the compiled graph a token. The prompt runs
eagerly (its batched kernels are most of its time). Where compiling fails (no C++ compiler for inductor, a model
the compiler cannot take), the first step warns with the reason and the decoder runs its eager step from then on.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..decode import is_compile_failure
from .engine import LeanDecoder


# inductor's C++ wrapper: the compiled graph's ~10 calls a layer (the bitlab ops, two bmm, the fused loops) are made
# from C++, not from a generated Python function (SmolLM2, 2 threads: 221 tokens/s against 167 with the Python
# wrapper; its first compile takes longer, ~2 min on SmolLM2, then inductor's cache serves it)
COMPILE_OPTIONS = {"cpp_wrapper": True}


class CompiledStep:
    """``step(ids, position)``: the logits of one token ``ids [1]`` at the int ``position``, compiled (see above)."""

    def __init__(self, decoder: LeanDecoder):
        self.decoder = decoder
        self.graph = torch.compile(decoder.step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)
        self.failure: Optional[str] = None  # why compiling failed, once it has

    def __call__(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        if self.failure is None:
            try:
                return self.graph(ids, torch.tensor([position]))
            except Exception as e:  # noqa: BLE001  (a compiler failure: decode eagerly; anything else is raised)
                if not is_compile_failure(e):
                    raise
                self.failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                warnings.warn(f"bitlab_fx.greedy_decode(engine='lean-compiled'): compiling the lean step failed, "
                              f"decoding with the eager lean step instead ({self.failure})", RuntimeWarning,
                              stacklevel=4)
        return self.decoder.forward(ids, position)


def compiled_step(decoder: LeanDecoder) -> CompiledStep:
    """The decoder's compiled step (made on first use and kept with the decoder, so later calls reuse its graph)."""
    step = decoder.__dict__.get("_compiled_step")
    if step is None:
        step = decoder.__dict__["_compiled_step"] = CompiledStep(decoder)
    return step
