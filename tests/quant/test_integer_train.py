"""The integer training forward (``QuantConfig(train_kernel="int8")``, ``quant/integer_train.py``).

Each test prepares the same float model twice, with the fake-quant layers and with the integer forward, and
checks what a user relies on when switching: the same outputs and losses, the same gradients (to float
rounding), the same weights after optimizer steps, and fewer bytes kept for the backward.
"""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant
from _helpers import ACTIVATION_SPECS, SmallNet

WEIGHTS = {
    "ternary": bfx.TernaryWeight(),
    "ternary-absmax-tensor": bfx.TernaryWeight("per_tensor", "absmax"),
    "ternary-group32": bfx.TernaryWeight(bfx.PerGroup(32)),
    "ternary-learned": bfx.TernaryWeight(scale="learned"),
    "int2": bfx.IntWeight(2),
    "int4-group16": bfx.IntWeight(4, bfx.PerGroup(16)),
    "int8": bfx.IntWeight(8),
    "int8-learned": bfx.IntWeight(8, scale="learned"),
}
ACTS = ACTIVATION_SPECS


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 10))


def _pair(model, config, **kwargs):
    """The model prepared with fake quant and with the integer training forward."""
    int8 = dataclasses.replace(config, train_kernel="int8")
    return bfx.prepare_qat(copy.deepcopy(model), config, **kwargs), bfx.prepare_qat(copy.deepcopy(model), int8, **kwargs)


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y)
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(a, b, x, y):
    out_a, loss_a, grads_a = _loss_and_grads(a, x, y)
    out_b, loss_b, grads_b = _loss_and_grads(b, x, y)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)  # both are the converted op's value
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("weight", WEIGHTS)
def test_same_loss_and_gradients_as_fake_quant(weight, act):
    fq, integer = _pair(_mlp(), bfx.QuantConfig(weight=WEIGHTS[weight], input=ACTS[act]))
    x, y = torch.randn(2, 12, 64) * 3, torch.randint(0, 10, (24,))
    for _ in range(2):  # the second step: learned activation steps are initialised by the first batch
        _assert_same_step(fq.train(), integer.train(), x, y)


def test_same_weights_after_training():
    fq, integer = _pair(_mlp(), bfx.ternary())
    g = torch.Generator().manual_seed(0)
    for model in (fq, integer):
        g.manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(5):
            x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), (_, b) in zip(fq.named_parameters(), integer.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_conv_layers():
    """Conv2d, a depthwise conv and a functional linear (SmallNet): int8 codes saved, same gradients."""
    fq, integer = _pair(SmallNet(), bfx.ternary())
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    _assert_same_step(fq.train(), integer.train(), x, y)


def test_bf16_autocast():
    fq, integer = _pair(_mlp(), bfx.ternary())
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same_step(fq.train(), integer.train(), x, y)


def _saved_activation_bytes(model, x, y) -> int:
    """Bytes of the activations autograd keeps for the backward (each storage once): what it saves, less the
    parameters and tensors of a parameter's shape (their quantized values or codes)."""
    params = {p.data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and tuple(t.shape) not in weight_shapes:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y).backward()
    return sum(seen.values())


def test_saved_activations_are_int8_codes():
    """Layers whose input is kept only by themselves (a linear after a linear, after GELU's input): the integer
    forward keeps int8 codes and one multiplier per token, under 0.3x the float model's bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 10))
    fq, integer = _pair(model, bfx.ternary())
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    fp32 = _saved_activation_bytes(model, x.requires_grad_(), y)
    assert _saved_activation_bytes(integer.train(), x, y) <= 0.3 * fp32 <= _saved_activation_bytes(fq.train(), x, y)


class _Siblings(nn.Module):
    """Three layers reading one input (like q/k/v projections), through a norm that keeps its input, not its output."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(256)
        self.q, self.k, self.v = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        h = self.norm(x)
        return self.head(self.q(h) * self.k(h) + self.v(h))


def test_sibling_layers_save_one_copy_of_their_input_codes():
    torch.manual_seed(0)
    model = _Siblings()
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    mapping = bfx.QConfigMapping().set_global(bfx.QuantConfig("ternary", "int8", train_kernel="int8"))
    integer = bfx.prepare_qat(copy.deepcopy(model), mapping.set_module_name("head", None))
    fp32 = _saved_activation_bytes(model, x, y)
    # fp32 keeps h once for q, k and v; the integer forward keeps its int8 codes once (plus the norm's own tensors,
    # the products' inputs and the float head's input, the same in both)
    h_bytes = 64 * 256 * 4
    assert _saved_activation_bytes(integer.train(), x, y) <= fp32 - h_bytes + 0.3 * h_bytes


def test_quantizers_return_stand_ins_only_for_layers_computed_from_codes():
    """Input and weight quantizers read only by layer calls that compute their value from the codes return their
    input (both train kernels; the layer makes the float values its backward needs from the codes); an output
    quantizer, read by a float op, returns its fake-quant value."""
    config = dataclasses.replace(bfx.ternary(), output=bfx.IntActivation(8))
    for model in _pair(_mlp(), config):
        quantizers = {n: m for n, m in model.named_modules() if isinstance(m, (ActivationFakeQuant, WeightFakeQuant))}
        outputs = {n for n in quantizers if n.endswith("_output_fq")}
        assert outputs and len(quantizers) > len(outputs)
        assert {n for n, m in quantizers.items() if not m.stand_in} == outputs
        x = torch.randn(4, 64)
        assert torch.equal(quantizers["0_input_fq"](x), x)
        assert not torch.equal(quantizers["0_output_fq"](x), x)
    _, integer = _pair(_mlp(), bfx.ternary())
    assert "train_kernel='int8'" in integer.code or 'train_kernel = \'int8\'' in integer.code


@pytest.mark.parametrize("off", ["input", "weight"])
def test_one_quantizer_off_gives_the_float_call(off):
    """A layer whose input (or weight) quantizer is disabled computes the float call; the quantizer that is still on
    gives its fake-quant value, not its stand-in."""
    fq, integer = _pair(_mlp(), bfx.ternary())
    for model in (fq, integer):
        getattr(model, f"0_{off}_fq").enabled = False
    _assert_same_step(fq.train(), integer.train(), torch.randn(8, 64), torch.randint(0, 10, (8,)))


def test_warmup_blend():
    fq, integer = _pair(_mlp(), bfx.ternary())
    for model in (fq, integer):
        bfx.QuantWarmup(model, ramp_steps=4).step()
    _assert_same_step(fq.train(), integer.train(), torch.randn(8, 64), torch.randint(0, 10, (8,)))


def test_converts_to_the_same_model():
    fq, integer = _pair(_mlp(), bfx.ternary())
    x = torch.randn(8, 64)
    integer.train()(x).sum().backward()
    converted = bfx.convert(copy.deepcopy(integer).eval())
    torch.testing.assert_close(converted(x), integer.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("train_kernel", ["fake_quant", "int8"])
def test_compiled_training_step_fullgraph(train_kernel):
    """torch.compile(fullgraph=True) of a prepared model trains (no graph break, no host sync in the step) and gives
    the eager step's loss and gradients."""
    eager = bfx.prepare_qat(_mlp(), dataclasses.replace(bfx.ternary(), train_kernel=train_kernel))
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    out_e, loss_e, grads_e = _loss_and_grads(eager.train(), x, y)
    out_c, loss_c, grads_c = _loss_and_grads(compiled.train(), x, y)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[f"_orig_mod.{name}"], g, rtol=1e-4, atol=1e-6)


def test_train_kernel_is_checked():
    with pytest.raises(bfx.ConfigError, match="train_kernel='int4'.*fake_quant, int8"):
        bfx.QuantConfig(weight="ternary", input="int8", train_kernel="int4")
    config = bfx.QuantConfig(weight="ternary", input="int8", train_kernel="int8")
    assert bfx.QuantConfig.from_dict(config.to_dict()) == config
