"""Bad and awkward input: user mistakes raise a BitlabError that says what to do; valid-but-unusual
input gets the right answer from a converted model.

"Right" means: equal to ``bitlab_fx.ops.reference`` called on the converted layer's own buffers (the
oracle; tight tolerance, the CPU kernel matches it to the last bits), close to the prepared model in
eval mode (same integers, float rescale order may differ), finite, and in the input's dtype.
See docs/reliability.md.
"""
import copy
import threading

import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.ops import reference
from bitlab_fx.quant.packing import FORMAT_VERSION


def one_layer(k=64, n=24, cfg=None, bias=True, seed=0):
    torch.manual_seed(seed)
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(k, n, bias=bias)), cfg or bfx.ternary())
    return pm.eval(), bfx.convert(pm.eval())


def oracle(cm, x):
    """The reference op called on exactly the arguments the converted graph passes to its bitlab op."""
    (node,) = [n for n in cm.graph.nodes if n.op == "call_function" and "bitlab" in str(n.target)]

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return x if a.op == "placeholder" else cm.get_buffer(a.target)
        return a

    schema = node.target._schema.arguments
    bound = dict(zip([a.name for a in schema], map(arg, node.args)))
    bound.update({name: arg(a) for name, a in node.kwargs.items()})
    if bound.get("act_multiplier") is not None:  # the reference takes the multiplier in the positional slot
        bound["act_scale"] = bound["act_multiplier"]
    values = [bound.get(a.name, a.default_value) for a in schema if a.name != "act_multiplier"]
    return getattr(reference, node.target._opname)(*values)


def assert_right(cm, pm, x, prepared_atol=1e-4):
    y = cm(x)
    want = oracle(cm, x)
    assert y.dtype == x.dtype and y.shape == want.shape
    assert torch.isfinite(y).all()
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[x.dtype]
    scale = want.float().abs().amax().clamp(min=1.0) if want.numel() else 1.0
    assert torch.allclose(y.float(), want.float(), atol=tol * scale, rtol=tol), (y.float() - want.float()).abs().max()
    if x.dtype == torch.float32 and pm is not None:
        with torch.no_grad():
            p = pm(x)
        assert torch.allclose(y, p, atol=prepared_atol * max(1.0, p.abs().max().item() if p.numel() else 1.0))
    return y


# ---------------------------------------------------------------- user mistakes -> BitlabError

@pytest.mark.parametrize("make, match", [
    (lambda: bfx.IntWeight(bits=9), r"IntWeight\(bits=9\).*from 2 to 8"),
    (lambda: bfx.IntWeight(bits=1), r"TernaryWeight\(\) for 1.58 bits"),
    (lambda: bfx.IntActivation(bits=16), r"IntActivation\(bits=16\)"),
    (lambda: bfx.IntActivation(dynamic=False), r"granularity='per_tensor'"),
    (lambda: bfx.PerGroup(0), r"PerGroup\(size=0\).*positive int"),
    (lambda: bfx.PerGroup(-4), r"positive int"),
    (lambda: bfx.TernaryWeight(scale="median"), r"scale='median'"),
    (lambda: bfx.TernaryWeight(granularity="per_row"), r"unknown granularity 'per_row'"),
    (lambda: bfx.QuantConfig(weight="int17"), r"weight='int17'"),
    (lambda: bfx.QuantConfig(input="fp8"), r"activation='fp8'"),
])
def test_invalid_configs_raise_config_error(make, match):
    with pytest.raises(bfx.ConfigError, match=match):
        make()


@pytest.mark.parametrize("k, group", [(48, 32), (128, 256), (100, 3)])
def test_impossible_group_sizes_name_layer_rule_and_shapes(k, group):
    model = nn.Sequential(nn.Linear(k, 8))
    with pytest.raises(bfx.ConfigError, match=rf"layer '0'.*rule.*group size {group} does not divide in_features={k}"):
        bfx.prepare_qat(model, bfx.ternary(bfx.PerGroup(group)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_at_convert(bad):
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2)), bfx.ternary())
    with torch.no_grad():
        pm.get_submodule("2").weight[1, 3] = bad
    with pytest.raises(bfx.ConvertError, match=r"layer '2'.*1 NaN/inf value.*set_module_name"):
        bfx.convert(pm)


def test_convert_unprepared_converted_or_wrapped_models():
    with pytest.raises(bfx.ConvertError, match="prepare_qat"):
        bfx.convert(nn.Linear(4, 4))
    with pytest.raises(bfx.ConvertError, match="not prepared with bfx.prepare_qat"):  # (was test_errors.py)
        bfx.convert(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)))
    _, cm = one_layer()
    with pytest.raises(bfx.ConvertError, match="already converted"):
        bfx.convert(cm)


def test_convert_of_a_ddp_wrapper_says_to_unwrap(monkeypatch):
    pm, _ = one_layer()
    fake_ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(fake_ddp)  # a DDP instance without a process group, only for the type check
    fake_ddp.module = pm
    with pytest.raises(bfx.ConvertError, match=r"ddp_model\.module"):
        bfx.convert(fake_ddp)


def test_state_dict_with_wrong_format_version():
    _, cm = one_layer()
    sd = cm.state_dict()
    key = next(k for k in sd if k.endswith("_extra_state"))
    sd[key] = dict(sd[key], format_version=FORMAT_VERSION + 1)
    with pytest.raises(bfx.ConvertError, match=rf"layer '0'.*format version {FORMAT_VERSION + 1}.*re-convert"):
        cm.load_state_dict(sd)


def test_state_dict_of_a_different_layer_shape():
    _, small = one_layer(k=64, n=24)
    _, other = one_layer(k=200, n=24)
    with pytest.raises(bfx.ConvertError, match=r"layer '0': saved weight ternary \[24, 200\] does not match this layer \(ternary \[24, 64\]\)"):
        small.load_state_dict(other.state_dict())
    # a matching shape but a different format: int8 weights into a ternary layer
    _, int8 = one_layer(k=64, n=24, cfg=bfx.int8())
    with pytest.raises(bfx.ConvertError, match=r"saved weight int8 \[24, 64\] does not match this layer \(ternary"):
        small.load_state_dict(int8.state_dict())
    # the same weights with another activation mode (per-tensor dynamic into per-token)
    _, per_tensor = one_layer(k=64, n=24, cfg=bfx.ternary(activation_granularity="per_tensor"))
    with pytest.raises(bfx.ConvertError, match=r"activation quantization 'per_tensor', this layer uses 'per_token'"):
        small.load_state_dict(per_tensor.state_dict())


def test_convert_of_a_static_observer_that_never_saw_data_warns():
    cfg = bfx.QuantConfig(weight="ternary", input=bfx.IntActivation(granularity="per_tensor", dynamic=False))
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(16, 4)), cfg)
    with pytest.warns(UserWarning, match=r"static activation quantizer of '0'.*never saw data.*calibration"):
        bfx.convert(pm)


def test_state_dict_round_trip_gives_the_same_outputs():
    _, a = one_layer(seed=0)
    _, b = one_layer(seed=1)
    x = torch.randn(5, 64)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


def test_device_mismatch_between_input_and_packed_weights():
    _, cm = one_layer()
    with pytest.raises(bfx.KernelError, match=r"input is on meta but the quantized weight is on cpu.*model.to\('meta'\)"):
        cm(torch.randn(2, 64, device="meta"))


@pytest.mark.parametrize("k", [63, 65, 128, 1])
def test_wrong_k(k):
    _, cm = one_layer(k=64)
    with pytest.raises(bfx.KernelError, match=rf"K={k}"):
        cm(torch.randn(3, k))


def test_wrong_input_dtype_and_scalar_input():
    _, cm = one_layer()
    with pytest.raises(bfx.KernelError, match="dtype"):
        cm(torch.ones(2, 64, dtype=torch.float64))
    with pytest.raises(bfx.KernelError, match="dtype"):
        cm(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(bfx.KernelError, match="dtype"):
        cm(torch.ones(2, 64, dtype=torch.int64))


# ---------------------------------------------------------------- valid but unusual -> right answer

@pytest.fixture(scope="module", params=["ternary", "ternary_group", "int8", "static"])
def layer(request):
    cfg = {"ternary": bfx.ternary(), "ternary_group": bfx.ternary(bfx.PerGroup(32)), "int8": bfx.int8(),
           "static": bfx.QuantConfig(weight="ternary", input=bfx.IntActivation(granularity="per_tensor",
                                                                                dynamic=False))}[request.param]
    torch.manual_seed(0)
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(96, 40)), cfg)
    if request.param == "static":
        pm.train()(torch.randn(16, 96))  # calibrate the observer
    return pm.eval(), bfx.convert(pm.eval())


def test_empty_batch(layer):
    pm, cm = layer
    for shape in [(0, 96), (0, 5, 96), (3, 0, 96)]:
        y = cm(torch.randn(shape))
        assert y.shape == shape[:-1] + (40,) and y.dtype == torch.float32


@pytest.mark.parametrize("shape", [(96,), (2, 96), (2, 3, 96), (2, 3, 4, 96)])
def test_input_ranks(layer, shape):
    pm, cm = layer
    torch.manual_seed(1)
    x = torch.randn(shape)
    y = assert_right(cm, pm, x)
    assert y.shape == shape[:-1] + (40,)
    # per-token: each row's answer does not depend on the batch around it
    if len(shape) > 1 and cm.get_submodule("0").act == "per_token":
        assert torch.allclose(y.reshape(-1, 40)[0], cm(x.reshape(-1, 96)[0]), atol=1e-6)


def test_non_contiguous_and_transposed_inputs(layer):
    pm, cm = layer
    torch.manual_seed(2)
    strided = torch.randn(6, 192)[:, ::2]
    transposed = torch.randn(96, 7).t()
    sliced = torch.randn(4, 5, 96).transpose(0, 1)
    expanded = torch.randn(1, 96).expand(4, 96)
    for x in (strided, transposed, sliced, expanded):
        assert not x.is_contiguous()
        assert torch.equal(cm(x), cm(x.contiguous()))
        assert_right(cm, pm, x)


@pytest.mark.parametrize("k", [1, 5, 100, 127, 129, 200, 256])
def test_k_not_a_multiple_of_the_packing_block(k):
    pm, cm = one_layer(k=k, n=9)
    torch.manual_seed(k)
    assert_right(cm, pm, torch.randn(4, k))


def test_all_zero_input_rows_give_the_bias(layer):
    pm, cm = layer
    x = torch.randn(4, 96)
    x[1] = 0
    y = assert_right(cm, pm, x)
    q = cm.get_submodule("0")
    if q.act == "per_token":
        assert torch.allclose(y[1], q.bias)
    assert torch.allclose(cm(torch.zeros(3, 96)), q.bias.expand(3, 40))


def test_all_zero_weight_rows_have_no_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight[2] = 0
        model[0].weight[5, :32] = 0  # a zero group
    for cfg in (bfx.ternary(), bfx.ternary(bfx.PerGroup(32)), bfx.int8()):
        pm = bfx.prepare_qat(copy.deepcopy(model), cfg).eval()
        cm = bfx.convert(pm)
        ws = cm.get_submodule("0").weight_scale
        assert torch.isfinite(ws).all() and (ws > 0).all()
        y = assert_right(cm, pm, torch.randn(3, 64))
        assert torch.allclose(y[:, 2], model[0].bias[2].expand(3))
    # a whole zero model: every scale is eps, every output is the bias
    with torch.no_grad():
        model[0].weight.zero_()
    cm = bfx.convert(bfx.prepare_qat(model, bfx.ternary()))
    assert torch.allclose(cm(torch.randn(3, 64)), model[0].bias.expand(3, 8))


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1e6, 1e30])
def test_huge_and_tiny_magnitudes(layer, magnitude):
    """The int8 step is max|x|/127 but never below EPS/127 (EPS = 1e-5): rows with max|x| < EPS are
    quantized on that fixed grid, so values under EPS/254 (~4e-8) become 0 and the output is the bias,
    exactly as in the prepared model. Huge rows are finite as long as the result fits in the dtype."""
    pm, cm = layer
    torch.manual_seed(3)
    x = torch.randn(4, 96) * magnitude
    q = cm.get_submodule("0")
    y = assert_right(cm, pm, x, prepared_atol=1e-4)
    if magnitude < 1e-8 and q.act == "per_token":
        assert torch.allclose(y, q.bias.expand(4, 40))


def test_static_scale_saturates_out_of_range_inputs():
    torch.manual_seed(0)
    cfg = bfx.QuantConfig(weight="ternary", input=bfx.IntActivation(granularity="per_tensor", dynamic=False))
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(32, 4)), cfg)
    pm.train()(torch.randn(8, 32))
    pm.eval()
    cm = bfx.convert(pm)
    x = torch.randn(3, 32) * 1e30
    y = assert_right(cm, pm, x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes_give_output_in_that_dtype(layer, dtype):
    pm, cm = layer
    torch.manual_seed(4)
    x = torch.randn(5, 96).to(dtype)
    y = assert_right(cm, pm, x)
    assert y.dtype == dtype
    # the same numbers as fp32 up to the rounding of the input and output
    with torch.no_grad():
        y32 = cm(x.float())
    assert torch.allclose(y.float(), y32, atol=0.05 * y32.abs().max().item(), rtol=0.02)


def test_model_cast_to_half_precision_keeps_fp32_scales():
    pm, cm = one_layer()
    half = copy.deepcopy(cm).to(torch.bfloat16)
    q = half.get_submodule("0")
    assert q.weight_scale.dtype == torch.float32 and q.packed_weight.dtype == torch.uint8
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert half(x).dtype == torch.bfloat16


def test_conv_model_unusual_inputs():
    torch.manual_seed(0)
    pm = bfx.prepare_qat(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)), bfx.ternary()).eval()
    cm = bfx.convert(pm)
    x = torch.randn(2, 3, 9, 7)
    for inp in (x, x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2), torch.zeros(2, 3, 9, 7),
                x[:0], x.to(torch.bfloat16)):
        y = cm(inp)
        assert y.dtype == inp.dtype and y.shape == (inp.shape[0], 5, 9, 7) and torch.isfinite(y).all()
    assert torch.allclose(cm(x), pm(x), atol=1e-4)
    with pytest.raises(bfx.KernelError, match="channels"):
        cm(torch.randn(2, 4, 9, 7))
    with pytest.raises(bfx.KernelError, match="4-D"):
        cm(torch.randn(3, 9, 7))


# ---------------------------------------------------------------- thread safety

def test_threads_calling_one_converted_model_match_serial_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 64), nn.ReLU(), nn.Linear(64, 16))
    cm = bfx.convert(bfx.prepare_qat(model, bfx.ternary()).eval())
    inputs = [torch.randn(3 + i % 4, 200) for i in range(48)]
    serial = [cm(x) for x in inputs]
    results, errors = [None] * len(inputs), []
    barrier = threading.Barrier(8)

    def work(tid):
        try:
            barrier.wait()
            for i in range(tid, len(inputs), 8):
                results[i] = cm(inputs[i])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(torch.equal(a, b) for a, b in zip(results, serial))
