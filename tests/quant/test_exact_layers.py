"""Prepared == converted, bit for bit, for every weight and activation spec, on every kernel path.

A prepared layer with int8 input codes computes its forward value from the codes with the converted ops'
arithmetic (``quant/exact_layers.py``), so after any training, wherever float training lands on this CPU,
the converted model gives exactly the prepared model's eval output (one flipped rounding tie in a hidden
layer would change a whole code step downstream, far above float rounding). Every path is checked: the
reference ops (kernel disabled) and each ISA of the CPU kernel this machine has.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.layer_kinds import LAYER_KINDS
from bitlab_fx.ops import cpu
from bitlab_fx.quant import exact_layers
from bitlab_fx.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant
from _helpers import ACTIVATION_SPECS

ISAS = [n for n in ("scalar", "avx2", "vnni") if cpu.kernel_library() is not None and cpu.set_isa(n) == n]
cpu.set_isa(None)
PATHS = ["reference"] + ISAS


@pytest.fixture(params=PATHS)
def kernel_path(request, monkeypatch):
    """Run the bitlab ops on the reference (kernel disabled) or on one ISA of the CPU kernel."""
    if request.param == "reference":
        monkeypatch.setenv("BITLAB_FX_DISABLE_CPU_KERNEL", "1")
    else:
        cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(None)


WEIGHTS = {
    "ternary": bfx.TernaryWeight(),
    "ternary-absmax-tensor": bfx.TernaryWeight("per_tensor", "absmax"),
    "ternary-learned": bfx.TernaryWeight(scale="learned"),
    "ternary-group32": bfx.TernaryWeight(bfx.PerGroup(32)),
    **{f"int{b}": bfx.IntWeight(b) for b in range(2, 9)},
    "int4-tensor": bfx.IntWeight(4, "per_tensor"),
    "int4-group16": bfx.IntWeight(4, bfx.PerGroup(16)),
    "int8-learned": bfx.IntWeight(8, scale="learned"),
}
ACTS = ACTIVATION_SPECS


def _train(model, x, y, steps=6, lr=1e-2):
    """A few optimizer steps: where the float weights land depends on the CPU; equality must not."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x).reshape(x.shape[0], -1)[:, :4], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _assert_converted_equals_prepared(prepared, x):
    with torch.no_grad():
        want = prepared(x)
        converted = bfx.convert(prepared)
        got = converted(x)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"
    for name, m in prepared.named_modules():  # the packed weight codes are the fake quantizer's codes
        if isinstance(m, WeightFakeQuant):
            layer = converted.get_submodule(m.layer)
            w = prepared.get_parameter(f"{m.layer}.weight")
            assert torch.equal(layer.int_weight().reshape(w.shape).float(), m.codes(w)[0]), name
    return converted


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("weight", WEIGHTS)
def test_mlp_converted_equals_prepared_bitwise(kernel_path, weight, act):
    torch.manual_seed(len(weight) * 7 + len(act))
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    prepared = bfx.prepare_qat(model, bfx.QuantConfig(weight=WEIGHTS[weight], input=ACTS[act]))
    x = torch.randn(48, 96) * 3
    _train(prepared, x, torch.randint(0, 4, (48,)))
    _assert_converted_equals_prepared(prepared, torch.randn(33, 96) * 2)


class _ConvNet(nn.Module):
    def __init__(self, conv1d=False):
        super().__init__()
        conv = nn.Conv1d if conv1d else nn.Conv2d
        self.c1 = conv(3, 8, 3)
        self.c2 = conv(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * (6 if conv1d else 36), 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("conv1d", [False, True], ids=["conv2d", "conv1d"])
@pytest.mark.parametrize("act", ["per_token", "per_tensor", "observed"])
@pytest.mark.parametrize("weight", ["ternary", "ternary-learned", "int4", "int8", "int3"])
def test_convnet_converted_equals_prepared_bitwise(kernel_path, weight, act, conv1d):
    torch.manual_seed(3)
    prepared = bfx.prepare_qat(_ConvNet(conv1d), bfx.QuantConfig(weight=WEIGHTS[weight], input=ACTS[act]))
    shape = (16, 3, 14) if conv1d else (16, 3, 14, 14)
    _train(prepared, torch.randn(shape), torch.randint(0, 4, (16,)))
    _assert_converted_equals_prepared(prepared, torch.randn(shape) * 2)


def test_brevitas_style_lenet_on_grid_inputs_are_fused_and_exact(kernel_path):
    """Quantized ReLUs (4-bit unsigned, static) feed the next layers through max-pool and flatten: the
    converted ops re-quantize those grid values exactly with the ReLU's multiplier, so they run on codes."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4))
    relu4 = bfx.IntActivation(4, signed=False, dynamic=False, granularity="per_tensor")
    qc = (bfx.QConfigMapping()
          .set_global(bfx.QuantConfig(weight=bfx.IntWeight(3), input=ACTS["observed"]))
          .set_object_type(nn.ReLU, bfx.QuantConfig(output=relu4)))
    prepared = bfx.prepare_qat(model, qc)
    x = torch.randn(16, 1, 28, 28)
    _train(prepared, x, torch.randint(0, 4, (16,)))
    converted = _assert_converted_equals_prepared(prepared, x)
    assert [converted.get_submodule(n).act for n in ("0", "3", "7", "9")] == ["per_tensor"] * 4
    layer = next(n for n in prepared.graph.nodes if n.target is exact_layers.conv2d and n.kwargs["on_grid"])
    assert layer.kwargs["input_quantizer"].target == "1_output_fq"


def test_integer_bias_with_static_input_is_exact(kernel_path):
    torch.manual_seed(2)
    cfg = bfx.QuantConfig(weight=bfx.IntWeight(4), input=ACTS["observed"], bias=bfx.IntBias(8))
    prepared = bfx.prepare_qat(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4)), cfg)
    x = torch.randn(40, 20)
    _train(prepared, x, torch.randint(0, 4, (40,)))
    _assert_converted_equals_prepared(prepared, x)


def test_bfloat16_model_converted_equals_prepared(kernel_path):
    torch.manual_seed(4)
    prepared = bfx.prepare_qat(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)), bfx.ternary())
    prepared = prepared.to(torch.bfloat16)
    _assert_converted_equals_prepared(prepared.eval(), torch.randn(9, 64, dtype=torch.bfloat16))


# -- the gradients are those of plain fake quantization ------------------------------------------------

def _grads(fn, *leaves):
    """Gradients of ``sum(fn() * G)`` for a fixed G (the forward values differ by float rounding)."""
    for t in leaves:
        t.grad = None
    y = fn()
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
@pytest.mark.parametrize("learned", [False, True])
def test_exact_layer_gradients_equal_the_float_fake_quant_call(kind, learned):
    torch.manual_seed(5)
    shapes = {"linear": ((6, 5, 24), (7, 24)), "conv2d": ((2, 4, 6, 6), (5, 4, 3, 3)), "conv1d": ((2, 4, 9), (5, 4, 3))}
    xs, ws = shapes[kind]
    x = torch.randn(xs, requires_grad=True)
    w = torch.randn(ws, requires_grad=True)
    b = torch.randn(ws[0], requires_grad=True)
    act = bfx.IntActivation(dynamic=False, granularity="per_tensor", learned=True) if learned else bfx.IntActivation()
    wspec = bfx.TernaryWeight(scale="learned") if learned else bfx.IntWeight(4)
    token_dims = {"linear": 1, "conv2d": 3, "conv1d": 2}[kind]
    afq = ActivationFakeQuant(act, token_dims=token_dims)
    wfq = WeightFakeQuant(wspec, weight=w)
    afq.train()(x)  # initialises a learned step
    params = [x, w, b] + list(afq.parameters()) + list(wfq.parameters())
    float_call = {"linear": F.linear, "conv2d": F.conv2d, "conv1d": F.conv1d}[kind]
    exact_call = LAYER_KINDS[kind].exact
    afq.eval()
    want = _grads(lambda: float_call(afq(x), wfq(w), b), *params)
    got = _grads(lambda: exact_call(afq(x), wfq(w), b, codes_from=x, weight=w, input_quantizer=afq,
                                    weight_quantizer=wfq), *params)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    y_exact = exact_call(afq(x), wfq(w), b, codes_from=x, weight=w, input_quantizer=afq, weight_quantizer=wfq)
    torch.testing.assert_close(y_exact, float_call(afq(x), wfq(w), b), rtol=1e-5, atol=1e-5)  # float rounding apart


@pytest.mark.parametrize("kind, wspec", [("linear", bfx.TernaryWeight()), ("linear", bfx.IntWeight(4, bfx.PerGroup(8))),
                                         ("conv2d", bfx.TernaryWeight()), ("conv1d", bfx.IntWeight(8))],
                         ids=["linear-ternary", "linear-int4-g8", "conv2d-ternary", "conv1d-int8"])
def test_stand_in_quantizers_give_the_same_values_and_gradients(kind, wspec):
    """Quantizers that return their input (``stand_in``, as ``prepare_qat`` sets them for layers computed from the
    codes, with the codes handed over): the layer makes its backward's float values from the codes, and the output
    and every gradient are bitwise those of the quantizers returning their fake-quant values."""
    torch.manual_seed(8)
    shapes = {"linear": ((6, 5, 24), (8, 24)), "conv2d": ((2, 4, 6, 6), (5, 4, 3, 3)), "conv1d": ((2, 4, 9), (5, 4, 3))}
    xs, ws = shapes[kind]
    x, w, b = torch.randn(xs, requires_grad=True), torch.randn(ws, requires_grad=True), torch.randn(ws[0], requires_grad=True)
    token_dims = {"linear": 1, "conv2d": 3, "conv1d": 2}[kind]
    results = []
    for stand_in in (False, True):
        afq, wfq = ActivationFakeQuant(bfx.IntActivation(), token_dims=token_dims), WeightFakeQuant(wspec)
        for fq in (afq, wfq):
            fq.stand_in = fq.hand_over = stand_in
        call = lambda: LAYER_KINDS[kind].exact(afq(x), wfq(w), b, codes_from=x, weight=w, input_quantizer=afq,  # noqa: E731
                                                weight_quantizer=wfq)
        results.append((call().detach(), _grads(call, x, w, b)))
    (y_fake, g_fake), (y_stand_in, g_stand_in) = results
    assert torch.equal(y_stand_in, y_fake)
    for got, want in zip(g_stand_in, g_fake):
        assert torch.equal(got, want)


def test_disabled_or_blending_quantizers_give_the_plain_float_call():
    torch.manual_seed(6)
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    afq, wfq = ActivationFakeQuant(bfx.IntActivation()), WeightFakeQuant(bfx.TernaryWeight())
    for fq, attr, value in ((afq, "enabled", False), (wfq, "mix", 0.5)):
        setattr(fq, attr, value)
        y = exact_layers.linear(afq(x), wfq(w), None, codes_from=x, weight=w, input_quantizer=afq, weight_quantizer=wfq)
        assert torch.equal(y, F.linear(afq(x), wfq(w)))
        setattr(fq, attr, True if attr == "enabled" else 1.0)


def test_autocast_does_not_round_the_integer_products():
    """Under torch.autocast the prepared model still equals the converted one (whose ops run in fp32)."""
    torch.manual_seed(7)
    prepared = bfx.prepare_qat(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)),
                               bfx.QuantConfig(weight=bfx.IntWeight(8), input=bfx.IntActivation())).eval()
    x = torch.randn(16, 256) * 4
    converted = bfx.convert(prepared)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(converted(x), prepared(x))
