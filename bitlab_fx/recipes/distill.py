"""Distillation QAT: train a prepared (fake-quant) student to match its float teacher, with checkpoint and resume.

The loop a pretrained model needs when it is quantized (docs/qat-llm.md)::

    student = bfx.prepare_qat(copy.deepcopy(model), mapping)         # the float model stays the teacher
    result = bfx.recipes.distill(student, model, batches, bfx.recipes.DistillConfig(steps=200, lr=1e-5))

``batches(i)`` returns micro-batch ``i`` (token ids ``[B, T]``); step ``s`` trains on micro-batches
``s * grad_accum ... s * grad_accum + grad_accum - 1``, so a run that resumes from a checkpoint trains on exactly
the batches the uninterrupted run would have. The loss is ``kl_weight * KL(teacher || student)`` on the logits at
``temperature`` (+ ``lm_weight`` times the plain next-token loss, + ``hidden_weight`` times the relative MSE of
the hidden states), the learning rate follows :func:`lr_factor`, and the quantizers ramp in with
:class:`~bitlab_fx.recipes.QuantWarmup` when ``quant_ramp_steps`` / ``quant_delay_steps`` are set.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .losses import hidden_mse, kl_logits, lm_loss
from .progress import Progress
from .teacher_cache import TeacherCache
from .warmup import QuantWarmup

LR_SCHEDULES = ("constant", "linear", "cosine")
AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DistillConfig:
    """What :func:`distill` trains for and how. Steps are optimizer steps (``grad_accum`` micro-batches each)."""

    steps: int
    lr: float = 1e-5
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"          # after lr_warmup_steps: constant, linear or cosine decay to min_lr_ratio * lr
    lr_warmup_steps: int = 0             # linear ramp of the learning rate from 0
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    hidden_weight: float = 0.0
    quant_ramp_steps: int = 0            # QuantWarmup: blend float -> quantized over these steps ...
    quant_delay_steps: int = 0           # ... after training this many steps in float
    autocast: Optional[str] = None       # "bf16" (or "fp16"): the student's forward under torch.autocast
    compile: bool = False                # the student's training step under bfx.compile once fully quantized
    checkpoint: Optional[str] = None     # a file: resumed from when it exists, written every checkpoint_every steps
    checkpoint_every: int = 50
    time_budget_s: Optional[float] = None  # stop (and checkpoint) once this much wall time has passed in this run
    progress_every: int = 10             # progress line every this many steps (every step on a terminal)

    def __post_init__(self):
        ints = {"steps": 1, "grad_accum": 1, "lr_warmup_steps": 0, "quant_ramp_steps": 0, "quant_delay_steps": 0,
                "checkpoint_every": 1, "progress_every": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"DistillConfig({name}={value!r}): must be an int >= {low}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"DistillConfig(lr_schedule={self.lr_schedule!r}): use one of {', '.join(LR_SCHEDULES)}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"DistillConfig(compile={self.compile!r}): must be True or False")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"DistillConfig(autocast={self.autocast!r}): use None, 'bf16' or 'fp16'")
        if self.temperature <= 0 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"DistillConfig(temperature={self.temperature}, lr={self.lr}, min_lr_ratio="
                              f"{self.min_lr_ratio}): temperature and lr must be > 0, min_lr_ratio in [0, 1]")
        if min(self.kl_weight, self.lm_weight, self.hidden_weight) < 0 or \
                self.kl_weight + self.lm_weight + self.hidden_weight == 0:
            raise ConfigError("DistillConfig: kl_weight, lm_weight and hidden_weight must be >= 0 and not all 0")


def lr_factor(step: int, config: DistillConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``config.lr``.

    >>> cfg = DistillConfig(steps=10, lr_warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.0)
    >>> [round(lr_factor(s, cfg), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < config.lr_warmup_steps:
        return (step + 1) / config.lr_warmup_steps
    span = max(config.steps - config.lr_warmup_steps, 1)
    t = min(1.0, (step - config.lr_warmup_steps) / span)
    floor = config.min_lr_ratio
    if config.lr_schedule == "constant":
        return 1.0
    if config.lr_schedule == "linear":
        return floor + (1 - floor) * (1 - t)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class DistillResult:
    """``history``: one dict per optimizer step (step, loss, kl, lm, hidden, lr, mix, tokens: trained so far);
    ``steps_done``: the last completed step; ``resumed_from``: the step the run resumed at (0: fresh)."""

    history: List[dict] = field(default_factory=list)
    steps_done: int = 0
    resumed_from: int = 0
    seconds: float = 0.0


Batches = Union[Callable[[int], torch.Tensor], Sequence[torch.Tensor]]


def _logits_and_hidden(out, want_hidden: bool):
    if isinstance(out, torch.Tensor):
        if want_hidden:
            raise ConfigError("DistillConfig(hidden_weight > 0) needs models that return hidden states "
                              "(Hugging Face models with output_hidden_states=True); this one returns a tensor")
        return out, None
    return out.logits, (out.hidden_states if want_hidden else None)


def _call(model: nn.Module, ids: torch.Tensor, want_hidden: bool):
    kwargs = {"output_hidden_states": True} if want_hidden else {}
    return _logits_and_hidden(model(ids, **kwargs), want_hidden)


class _Trainer:
    """The state of one :func:`distill` run; each method is one part of a step."""

    def __init__(self, student, teacher, batches, config: DistillConfig, params, teacher_cache):
        self.student, self.teacher, self.config = student, teacher, config
        self.batch = batches if callable(batches) else (lambda i: batches[i % len(batches)])
        self.params = [p for p in (params if params is not None else student.parameters()) if p.requires_grad]
        if not self.params:
            raise ConfigError("distill: the student has no trainable parameters (all requires_grad=False)")
        if teacher_cache is not None and config.hidden_weight > 0:
            raise ConfigError("distill: a TeacherCache holds logits only; use hidden_weight=0 with teacher_cache")
        self.cache = teacher_cache
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        quantizing = config.quant_ramp_steps or config.quant_delay_steps
        self.warmup = QuantWarmup(student, config.quant_ramp_steps, config.quant_delay_steps) if quantizing else None
        self.step, self.history = 0, []
        self._compiled = None

    def _student_forward(self) -> nn.Module:
        """The module the step calls: the student, or with ``compile`` its ``bfx.compile`` wrapper (same parameters)
        once every quantizer is fully on. While QuantWarmup ramps, ``mix`` changes every step and each value would
        compile the graph again, so the ramp runs eagerly."""
        if not self.config.compile or (self.warmup is not None and self.warmup.mix < 1.0):
            return self.student
        if self._compiled is None:
            from ..training_compile import compile as compile_for_training
            self._compiled = compile_for_training(self.student)
        return self._compiled

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "student": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                "warmup": None if self.warmup is None else self.warmup.state_dict(),
                "config": dataclasses.asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.warmup is not None and state["warmup"] is not None:
            self.warmup.load_state_dict(state["warmup"])
        set_rng_state(state["rng"])
        self.step, self.history = state["step"], list(state["history"])

    def _teacher(self, ids: torch.Tensor):
        want_hidden = self.config.hidden_weight > 0
        with torch.no_grad():
            if self.cache is not None:
                return self.cache.logits(ids, lambda: _call(self.teacher, ids, False)[0]), None
            return _call(self.teacher, ids, want_hidden)

    def _micro_step(self, ids: torch.Tensor) -> dict:
        cfg = self.config
        t_logits, t_hidden = self._teacher(ids)
        dtype = AUTOCAST_DTYPES[cfg.autocast]
        with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype is not None):
            s_logits, s_hidden = _call(self._student_forward(), ids, cfg.hidden_weight > 0)
        parts = {"kl": kl_logits(s_logits, t_logits, cfg.temperature) if cfg.kl_weight else None,
                 "lm": lm_loss(s_logits, ids) if cfg.lm_weight else None,
                 "hidden": hidden_mse(s_hidden, t_hidden) if cfg.hidden_weight else None}
        weights = {"kl": cfg.kl_weight, "lm": cfg.lm_weight, "hidden": cfg.hidden_weight}
        loss = sum(weights[k] * v for k, v in parts.items() if v is not None)
        (loss / cfg.grad_accum).backward()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items() if v is not None}}

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its history entry."""
        cfg = self.config
        self.student.train()
        lr = cfg.lr * lr_factor(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals, tokens = {}, 0
        for micro in range(cfg.grad_accum):
            ids = self.batch(self.step * cfg.grad_accum + micro)
            for k, v in self._micro_step(ids).items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            tokens += ids.numel()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mix = self.warmup.mix if self.warmup is not None else 1.0
        if self.warmup is not None:
            self.warmup.step()
        self.step += 1
        previous = self.history[-1]["tokens"] if self.history else 0
        entry = {"step": self.step, **totals, "lr": lr, "mix": mix, "tokens": previous + tokens}
        self.history.append(entry)
        return entry


def distill(student: nn.Module, teacher: nn.Module, batches: Batches, config: DistillConfig, *,
            params=None, teacher_cache: Optional[TeacherCache] = None,
            callback: Optional[Callable[[int, dict], None]] = None, progress_stream=None) -> DistillResult:
    """Train ``student`` (a prepared model) towards ``teacher`` (its float model, left unchanged, run in eval mode
    without gradients) for ``config.steps`` optimizer steps; see the module docstring.

    ``params``: the parameters to train (default: every parameter of the student with ``requires_grad``; freeze
    e.g. the embedding with ``requires_grad_(False)``). ``teacher_cache``: a :class:`TeacherCache` that keeps the
    teacher's logits on disk for repeated epochs. ``callback(step, entry)``: called after every step (evaluate,
    log; it may switch the student to eval mode, each step switches it back). When ``config.checkpoint`` names a
    file that exists, the run resumes from it (same config expected) and continues to ``config.steps``.
    """
    trainer = _Trainer(student, teacher, batches, config, params, teacher_cache)
    state = load_checkpoint(config.checkpoint)
    if state is not None:
        trainer.load_state_dict(state)
    result = DistillResult(resumed_from=trainer.step)
    teacher.eval()
    bar = Progress(config.steps, progress_stream, config.progress_every, start_step=trainer.step)
    t0 = time.perf_counter()
    while trainer.step < config.steps:
        entry = trainer.train_step()
        bar.update(trainer.step, entry["loss"], tokens=entry["tokens"] - (trainer.history[-2]["tokens"]
                                                                          if len(trainer.history) > 1 else 0))
        last = trainer.step == config.steps
        out_of_time = config.time_budget_s is not None and time.perf_counter() - t0 >= config.time_budget_s
        if config.checkpoint and (trainer.step % config.checkpoint_every == 0 or last or out_of_time):
            save_checkpoint(config.checkpoint, trainer.state_dict())
        if callback is not None:
            callback(trainer.step, entry)
        if out_of_time:
            break
    result.history, result.steps_done = trainer.history, trainer.step
    result.seconds = time.perf_counter() - t0
    return result
