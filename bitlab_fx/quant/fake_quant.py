"""The fake-quant modules that ``prepare_qat`` inserts into graphs (``call_module`` nodes).

Each one quantizes and dequantizes in the forward pass and lets gradients pass straight through.
``enabled = False`` turns one into the identity (see ``bfx.disable_fake_quant``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..config import IntActivation, IntBias, IntWeight, TernaryWeight
from . import arithmetic as A
from . import primitives as P


class _CodesHandOver:
    """The codes a quantizer just computed, kept for the exact layer call right after it (``exact_layers``), so
    the layer does not quantize the same tensor again. Only while ``hand_over`` is set (by ``prepare_qat`` on
    quantizers that feed an exact layer), only in eager mode, and taken (dropped) by the first reader; valid
    only for the very tensor (same object, same version) they were computed from."""

    def _keep_codes(self, source: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
        if self.hand_over and not torch.compiler.is_compiling():
            self.__dict__["_codes"] = (source, source._version, codes, scale)

    def drop_codes(self) -> None:
        """Forget kept codes (a layer call that does not read them: they must not keep ``source`` alive)."""
        self.__dict__.pop("_codes", None)

    def __getstate__(self):  # never pickle or deep-copy a hand-over in flight
        state = self.__dict__.copy()
        state.pop("_codes", None)
        return state

    def take_codes(self, source: torch.Tensor):
        """``(codes, scale)`` computed from ``source`` by the last forward, or None (then compute them)."""
        if torch.compiler.is_compiling():
            return None
        kept = self.__dict__.pop("_codes", None)
        if kept is None or kept[0] is not source or kept[1] != source._version:
            return None
        return kept[2], kept[3]


class _FakeQuant(_CodesHandOver, nn.Module):
    """What every fake quantizer has: ``enabled`` and the float/quantized blend ``mix`` used by warm-up.

    ``mix = 1`` (default) is plain fake quantization; ``0 < mix < 1`` returns
    ``(1 - mix) * x + mix * fake_quant(x)`` (see ``bfx.QuantWarmup``); ``mix = 0`` is the identity.

    ``stand_in`` (set by ``prepare_qat`` when every reader of the output is a layer call computed from the codes,
    ``exact_layers``, with either train kernel): a fully-on quantizer whose straight-through gradient is the
    identity (no learned step) returns its input instead of the fake-quant value; the layer computes its value from
    the codes (handed over) and its gradients from the codes (the float values made from them in place, or the
    int8 codes saved by ``integer_train``), and asks :meth:`fake_value` for the float value when it falls back to
    the float call.
    """

    def __init__(self, spec, layer: str, rule: str):
        super().__init__()
        self.spec = spec
        self.layer = layer  # fqn of the layer this belongs to, for messages and summaries
        self.rule = rule
        self.enabled = True
        self.mix = 1.0
        self.hand_over = False  # keep the last codes for an exact layer call (see _CodesHandOver)
        self.stand_in = False  # return the input for integer layer calls (see the class docstring)

    def returns_stand_in(self) -> bool:
        """Whether ``forward`` returns its input for the layer to compute from the codes (``stand_in``, see above)."""
        return self.stand_in and self.enabled and self.mix >= 1.0 and not self.spec.learned

    def fake_value(self, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The fake-quant value of ``source`` when ``value`` is the stand-in this quantizer returned for it, else
        ``value`` as it is."""
        return self._fake_quantize(source) if self.returns_stand_in() else value

    def _blend(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q if self.mix >= 1.0 else torch.lerp(x, q, self.mix)

    def _active(self) -> bool:
        return self.enabled and self.mix > 0.0

    def extra_repr(self) -> str:
        return f"{self.spec}, layer={self.layer!r}, enabled={self.enabled}"


class WeightFakeQuant(_FakeQuant):
    """Fake-quantizes a weight tensor with a :class:`TernaryWeight` or :class:`IntWeight` spec.

    With ``scale="learned"`` it owns the step as a parameter ``scale`` (shape ``[1]``, ``[N]`` or
    ``[N, K/group]``), initialised from ``weight`` (absmean for ternary, absmax/q for int) and trained
    with the LSQ gradient; ``convert`` packs the weight with that step. Without it there is no state.
    """

    def __init__(self, spec: Union[TernaryWeight, IntWeight], layer: str = "", rule: str = "",
                 weight: Optional[torch.Tensor] = None):
        super().__init__(spec, layer, rule)
        if spec.learned:
            if weight is None:
                raise ValueError(f"WeightFakeQuant({spec}) for {layer!r}: a learned scale is initialised from the "
                                 "weight; pass weight=")
            self.scale = nn.Parameter(P.weight_scale(weight, spec).to(weight.device))

    @torch.no_grad()
    def reset_scale(self, weight: torch.Tensor) -> None:
        """Re-initialise a learned step from ``weight`` (e.g. after loading float weights into a prepared model)."""
        self.scale.copy_(P.weight_scale(weight, self.spec))

    def step(self, w: torch.Tensor) -> torch.Tensor:
        """The dequantization step used for ``w`` (fp32, no gradient): learned, or computed from ``w``."""
        if self.spec.learned:
            return P.learned_step(self.scale.detach().float())
        return P.weight_scale(w, self.spec)

    def codes(self, w: torch.Tensor):
        """``(wq, step)``: the integer weight (fp32 whole numbers, ``w``'s shape) and its step, exactly what
        ``convert`` packs (the ones the last forward computed from ``w``, when it handed them over)."""
        kept = self.take_codes(w)
        return kept if kept is not None else P.weight_codes(w, self.spec, self.scale if self.spec.learned else None)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self._active():
            return w
        if self.spec.learned:
            return self._blend(w, P.lsq_fake_quantize_weight(w, self.scale, self.spec))
        wq, g = P.weight_codes(w, self.spec)
        self._keep_codes(w, wq, g)
        if self.returns_stand_in():
            return w
        return self._blend(w, P.fake_quantize_weight(w, wq, g, self.spec.granularity))

    def _fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        wq, g = P.weight_codes(w, self.spec)
        return P.fake_quantize_weight(w, wq, g, self.spec.granularity)


class ActivationFakeQuant(_FakeQuant):
    """Fake-quantizes activations with an :class:`IntActivation` spec.

    ``token_dims`` is how many trailing dims form one token: 1 for linear layers (one scale per row),
    3 for conv2d (one scale per sample ``[C, H, W]``).

    Dynamic specs compute the scale from each input. Static specs (``dynamic=False``) observe the
    running max of ``|x|`` (exponential moving average, ``momentum``) while training, or in any mode
    inside ``bfx.calibrate(model)``, and use the stored value otherwise; ``observe = False`` freezes it.
    Under ``torch.distributed`` each
    observation is the max over all ranks (one tiny all-reduce per observer and training step), so
    DDP/FSDP training observes the global batch exactly like one process would; set
    ``sync_observer = False`` to keep per-rank ranges.

    Learned specs (``learned=True``) own the step as a parameter ``scale`` (``x ≈ xq * scale``): for the
    first ``init_batches`` training batches it is set from the observed range (``running_amax / qmax``),
    after that it is trained with the LSQ gradient and the observer stops.
    """

    def __init__(self, spec: IntActivation, token_dims: int = 1, layer: str = "", rule: str = "",
                 momentum: float = 0.1):
        super().__init__(spec, layer, rule)
        self.token_dims = token_dims
        self.observe = True
        self.calibrating = False  # observe in eval mode too (bfx.calibrate)
        self.momentum = momentum
        self.sync_observer = True
        self._init_done = False  # cached ``observed_batches >= init_batches``: no host sync once initialised
        if not spec.dynamic:
            self.register_buffer("running_amax", torch.zeros(()))
        if spec.learned:
            self.init_batches = 8
            self.register_buffer("observed_batches", torch.zeros((), dtype=torch.long))
            self.scale = nn.Parameter(torch.zeros(()))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_done = False  # re-read observed_batches after a load

    def multiplier(self, x: torch.Tensor) -> torch.Tensor:
        """The multiplier ``s`` used for ``x`` (``xq = round(x * s)``)."""
        if self.spec.dynamic:
            return P.activation_multiplier(x, self.spec, self.token_dims)
        if (self.training or self.calibrating) and self.observe and x.numel():  # an empty probe never observes
            self._observe(x)
        if self.spec.learned:
            return 1.0 / P.learned_step(self.scale.detach().float())
        return A.multiplier(self.running_amax, self.spec.qmax)

    def code_multiplier(self, xf: torch.Tensor, token_dims: int) -> torch.Tensor:
        """The multiplier a converted op uses for the fp32 input ``xf`` of a layer with ``token_dims``
        trailing dims per token: computed from ``xf`` when dynamic, the stored one (never observing) when
        static. Broadcasts against ``xf``."""
        if self.spec.dynamic:
            return P.activation_multiplier(xf, self.spec, token_dims)
        return self.multiplier(xf.new_empty(0))

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        if self.spec.learned:
            if not self._init_done:
                self._init_done = int(self.observed_batches) >= self.init_batches
            if self._init_done:
                return  # initialised: from now on the step is trained
            self.observed_batches += 1
        amax = P.activation_amax(x.detach().float(), self.spec).to(self.running_amax.dtype)
        if self._distributed():  # the max over ranks: every rank observes the global batch
            dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        # the first observation sets the range, later ones move it by ``momentum`` (no host sync)
        first = self.running_amax == 0
        self.running_amax.copy_(torch.where(first, amax, torch.lerp(self.running_amax, amax, self.momentum)))
        if self.spec.learned:
            self.scale.copy_(self.running_amax.float() / self.spec.qmax)

    def _distributed(self) -> bool:
        return (self.sync_observer and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._active():
            return x
        if self.spec.learned:
            self.multiplier(x)  # observes the first batches (initialisation)
            return self._blend(x, P.lsq_fake_quantize_activation(x, self.scale, self.spec))
        q, s = self.codes(x, observe=True)
        self._keep_codes(x, q, s)
        if self.returns_stand_in():
            return x
        return self._blend(x, P.fake_quantize_activation(x, q, s))

    def codes(self, x: torch.Tensor, token_dims: Optional[int] = None, observe: bool = False):
        """``(codes, multiplier)`` of ``x`` (fp32 whole numbers; the multiplier broadcasts against ``x``), as the
        converted op computes them for a layer with ``token_dims`` trailing dims per token (default: this
        quantizer's). ``observe``: a static quantizer first observes ``x`` as its forward does (in training or
        calibration); otherwise its stored range is used as it is."""
        token_dims = self.token_dims if token_dims is None else token_dims
        if self.spec.dynamic:
            return P.dynamic_activation_codes(x, self.spec, token_dims)
        s = self.multiplier(x if observe else x.new_empty(0))  # (an empty probe never observes)
        return P.quantize_activation(x, s, self.spec), s

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        q, s = self.codes(x)  # the forward's codes, not observing again
        return P.fake_quantize_activation(x, q, s)


class BiasFakeQuant(_FakeQuant):
    """Fake-quantizes a bias with an :class:`IntBias` spec on the step ``input_step * weight_step``
    (Brevitas' ``Int8Bias``): ``call_module[fc1_bias_fq](bias, weight)``.

    ``input_fq`` is the activation quantizer that feeds the layer (its step is ``1/multiplier``); it is held as a
    plain reference, not a submodule (it already lives in the graph). When it is static, the step is one number
    per output channel and ``forward`` returns the fake-quantized bias. When it is dynamic (the layer's own
    per-token input quantizer), the step changes with every token (``w_step / x_mult[token]``, :attr:`per_token`):
    ``forward`` returns the float bias, and the layer call quantizes it per token from the multipliers it computes
    its input codes with (``exact_layers``; the converted op does the same at run time, ``bias_bits``).
    """

    def __init__(self, spec: IntBias, weight_spec: Union[TernaryWeight, IntWeight], input_fq: "ActivationFakeQuant",
                 layer: str = "", rule: str = "", weight_fq: Optional["WeightFakeQuant"] = None):
        super().__init__(spec, layer, rule)
        self.weight_spec = weight_spec
        object.__setattr__(self, "input_fq", input_fq)
        object.__setattr__(self, "weight_fq", weight_fq)  # its learned step, when the weight has one

    @property
    def per_token(self) -> bool:
        """Whether the input step is one per token (a dynamic input quantizer), so the bias codes are made per call."""
        return self.input_fq.spec.dynamic

    def step(self, weight: torch.Tensor, x_mult: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_step * weight_step``: ``[N]`` per channel or ``[1]`` per tensor (fp32, no gradient); per token,
        ``[T, N]`` from the multipliers ``x_mult`` of the call's tokens (:func:`arithmetic.token_bias_step`)."""
        wfq = self.__dict__.get("weight_fq")
        g = (wfq.step(weight) if wfq is not None else P.weight_scale(weight, self.weight_spec)).reshape(-1)
        if self.per_token:
            if x_mult is None:
                raise ValueError(f"the IntBias of {self.layer!r} is on a dynamic input: its step is one per token; "
                                 "pass the call's input multipliers x_mult")
            return A.token_bias_step(g, x_mult)
        return g / self.input_fq.multiplier(weight.new_empty(0)).float().reshape(-1)

    def quantizes(self) -> bool:
        """Whether ``forward`` returns exactly ``codes * step`` (on, not blending in, its input quantizer on)."""
        return self.enabled and self.mix >= 1.0 and self.input_fq.enabled

    def codes(self, bias: torch.Tensor, weight: torch.Tensor, x_mult: Optional[torch.Tensor] = None):
        """``(codes, step)``: the integer bias (fp32 whole numbers ``[N]``, or ``[T, N]`` per token) and its step, what
        ``convert`` stores as int32 (static input) and the layers add to their integer sums (``exact_layers``, the ops'
        ``bias_codes`` / ``bias_bits``)."""
        step = self.step(weight, x_mult)
        return A.bias_codes(bias, step, self.spec.bits), step

    def forward(self, bias: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self._active() or not self.input_fq.enabled or self.per_token:
            return bias
        return self._blend(bias, P.fake_quantize_bias(bias, self.step(weight), self.spec.bits))


FAKE_QUANT_TYPES = (WeightFakeQuant, ActivationFakeQuant, BiasFakeQuant)


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn every fake-quant module of ``model`` on or off."""
    for m in model.modules():
        if isinstance(m, FAKE_QUANT_TYPES):
            m.enabled = enabled
    return model


class calibrate:
    """Context manager: the static activation quantizers of ``model`` observe every forward pass inside it,
    in eval mode too, so post-training calibration runs the usual way (``eval()``, ``no_grad``) without
    moving BatchNorm statistics or dropping out::

        with torch.no_grad(), bfx.calibrate(prepared):
            prepared.eval()
            for x in calibration_batches:
                prepared(x)

    Quantizers frozen with ``bfx.disable_observer`` stay frozen. Dynamic quantizers have nothing to observe.
    Returns the number of static activation quantizers it switched on from ``__enter__``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._previous: list = []

    def __enter__(self) -> int:
        self._previous = [(m, m.calibrating) for m in self.model.modules()
                          if isinstance(m, ActivationFakeQuant) and not m.spec.dynamic]
        for m, _ in self._previous:
            m.calibrating = True
        return len(self._previous)

    def __exit__(self, *exc) -> None:
        for m, was in self._previous:
            m.calibrating = was
        self._previous = []


def set_observer(model: nn.Module, observe: bool) -> nn.Module:
    """Let the static activation quantizers of ``model`` update their observed ranges, or freeze them."""
    for m in model.modules():
        if isinstance(m, ActivationFakeQuant):
            m.observe = observe
    return model
