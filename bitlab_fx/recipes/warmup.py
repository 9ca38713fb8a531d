"""Training recipes for QAT: warm-up from float to quantized, and a quantization delay.

A small helper the training loop calls, not a custom trainer:

>>> import torch, bitlab_fx as bfx
>>> pm = bfx.prepare_qat(torch.nn.Sequential(torch.nn.Linear(8, 8)), bfx.ternary())
>>> warmup = bfx.QuantWarmup(pm, ramp_steps=100, delay_steps=10)
>>> warmup.mix                      # step 0: still float (inside the delay)
0.0
>>> for _ in range(60): _ = warmup.step()
>>> round(warmup.mix, 2)            # halfway up the ramp
0.5
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..quant.fake_quant import FAKE_QUANT_TYPES


class QuantWarmup:
    """Blend every fake quantizer of ``model`` from float to quantized over training steps.

    For the first ``delay_steps`` the model trains in float (``mix = 0``); over the next ``ramp_steps``
    the forward pass is ``(1 - mix) * x + mix * fake_quant(x)`` with ``mix`` rising linearly to 1
    (the "lambda ramp" of gradual quantization); after that it is plain QAT. Call :meth:`step`
    once per optimizer step. Useful when fine-tuning a float model into ternary: the abrupt switch
    to {-1, 0, 1} weights otherwise costs a loss spike that takes many steps to recover.
    """

    def __init__(self, model: nn.Module, ramp_steps: int, delay_steps: int = 0):
        if not isinstance(ramp_steps, int) or ramp_steps < 0 or not isinstance(delay_steps, int) or delay_steps < 0:
            raise ConfigError(f"QuantWarmup(ramp_steps={ramp_steps!r}, delay_steps={delay_steps!r}): "
                              "both must be non-negative ints (steps of the optimizer)")
        self.quantizers = [m for m in model.modules() if isinstance(m, FAKE_QUANT_TYPES)]
        if not self.quantizers:
            raise ConfigError("QuantWarmup: the model has no fake-quant modules; pass the result of bfx.prepare_qat")
        self.ramp_steps, self.delay_steps = ramp_steps, delay_steps
        self.step_count = 0
        self._apply()

    @property
    def mix(self) -> float:
        t = self.step_count - self.delay_steps
        if t < 0:
            return 0.0
        return 1.0 if self.ramp_steps == 0 else min(1.0, t / self.ramp_steps)

    def step(self) -> float:
        """Advance one training step; returns the new ``mix``."""
        self.step_count += 1
        self._apply()
        return self.mix

    def _apply(self) -> None:
        for m in self.quantizers:
            m.mix = self.mix

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
