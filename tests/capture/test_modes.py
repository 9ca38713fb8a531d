"""What capture must not bake in: the train/eval mode (functional dropout, attention dropout_p, batch norm),
the batch size (export frontend), and optional inputs left at their None default (fx frontend)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(F.dropout(torch.relu(self.a(x)), 0.5, training=self.training))


class Attention(nn.Module):
    """HF-style: dropout_p baked by a conditional on self.training; plus dropout flags that are literals."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out, self.p = nn.Linear(16, 48), nn.Linear(16, 16), 0.5

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        shape = (x.size(0), x.size(1), 2, 8)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        h = h.transpose(1, 2).reshape(x.shape)
        h = F.dropout(h, 0.5, training=False)  # literal: never drops
        h = F.alpha_dropout(h, 0.3, training=self.training)
        return self.out(h)


def _deterministic(m, x):
    with torch.no_grad():
        return torch.equal(m(x), m(x))


@pytest.mark.parametrize("capture_mode", ["train", "eval"])
def test_functional_dropout_follows_train_eval(capture_mode):
    torch.manual_seed(0)
    model = FunctionalDropout().train(capture_mode == "train")
    x = torch.randn(4, 32)
    pm = bfx.prepare_qat(model, bfx.ternary())
    assert [type(m) for m in pm.modules() if isinstance(m, nn.Dropout)] == [nn.Dropout]
    assert not _deterministic(pm.train(), x)  # dropout on in train mode
    assert _deterministic(pm.eval(), x)
    cm = bfx.convert(pm.eval())
    assert _deterministic(cm, x)
    with torch.no_grad():
        a, b = pm(x), cm(x)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4


@pytest.mark.parametrize("capture_mode", ["train", "eval"])
def test_attention_dropout_p_follows_train_eval_and_literal_flags_stay(capture_mode):
    torch.manual_seed(0)
    model = Attention().train(capture_mode == "train")
    x = torch.randn(3, 5, 16)
    pm = bfx.prepare_qat(model, bfx.ternary())
    kinds = sorted(type(m).__name__ for m in pm.modules() if type(m).__name__ in ("AttentionDropout", "AlphaDropout"))
    assert kinds == ["AlphaDropout", "AttentionDropout"]
    # the literal training=False dropout stays a call that never drops
    assert any(n.target is F.dropout and n.kwargs.get("training") is False for n in pm.graph.nodes)
    assert not _deterministic(pm.train(), x)
    assert _deterministic(pm.eval(), x)
    assert _deterministic(bfx.convert(pm), x)
    bfx.disable_fake_quant(pm)
    with torch.no_grad():
        assert torch.allclose(pm(x), model.eval()(x), atol=1e-5)


def test_forward_branching_on_training_warns_that_the_branch_is_kept():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if self.training:
                x = x + 0.1 * torch.randn_like(x)
            return self.fc(x)

    with pytest.warns(UserWarning, match="branches on self.training"):
        bfx.prepare_qat(Noisy(), bfx.ternary())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bfx.prepare_qat(FunctionalDropout(), bfx.ternary())  # mode only in constants: no warning


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4))


def test_export_batch_is_dynamic_by_default():
    x = torch.randn(4, 3, 8, 8)
    pe = bfx.prepare_qat(_bn_net(), bfx.ternary(), example_inputs=(x,), frontend="export")
    ce = bfx.convert(pe.eval())
    for m in (pe, ce):
        with torch.no_grad():
            assert m(x[:1]).shape == (1, 4) and m(torch.randn(7, 3, 8, 8)).shape == (7, 4)


def test_export_shape_the_model_fixes_gives_a_clear_error():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x.reshape(4, 8))

    pe = bfx.prepare_qat(Fixed(), bfx.ternary(), example_inputs=(torch.randn(4, 8),), frontend="export")
    with pytest.raises(bfx.CaptureError, match=r"captured by torch.export for inputs of shape \(4, 8\).*dynamic_shapes"):
        pe(torch.randn(2, 8))


@pytest.mark.parametrize("capture_mode", ["train", "eval"])
def test_export_batch_norm_follows_train_eval(capture_mode):
    net = _bn_net().train(capture_mode == "train")
    float_net = copy.deepcopy(net)
    x = torch.randn(4, 3, 8, 8)
    pe = bfx.prepare_qat(net, bfx.ternary(), example_inputs=(x,), frontend="export")
    assert not any(n.target is torch.ops.aten.batch_norm.default for n in pe.graph.nodes)
    bn = dict(pe.named_buffers())
    bfx.disable_fake_quant(pe).train()  # float: the running statistics must match the float model's
    with torch.no_grad():
        pe(x)
    assert bn["1.num_batches_tracked"].item() == 1 and not torch.equal(bn["1.running_mean"], torch.zeros(8))
    float_net.train()
    with torch.no_grad():
        float_net(x)  # the float model, one train step: the same running statistics
    assert torch.allclose(bn["1.running_mean"], float_net[1].running_mean, atol=1e-6)
    assert torch.equal(net[1].running_mean, torch.zeros(8))  # the input model is not modified
    bfx.enable_fake_quant(pe)

    for m in (pe.eval(), bfx.convert(pe.eval())):
        stats = {k: v.clone() for k, v in m.named_buffers() if k.startswith("1.")}
        with torch.no_grad():
            alone, in_batch = m(x[:1]), m(torch.cat([x[:1], 5 * torch.randn(3, 3, 8, 8)]))[:1]
        assert torch.allclose(alone, in_batch, atol=1e-5)  # eval: running statistics, not the batch's
        assert all(torch.equal(v, dict(m.named_buffers())[k]) for k, v in stats.items())
    bfx.disable_fake_quant(pe)
    with torch.no_grad():
        assert torch.allclose(pe(x), float_net.eval()(x), atol=1e-5)


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x, mask=None):
        h = torch.relu(self.a(x))
        if mask is not None:
            h = h.masked_fill(~mask, 0)
        return self.b(h)


@pytest.mark.parametrize("with_examples", [False, True])
def test_optional_input_not_given_is_traced_as_none(with_examples):
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    model = Masked()
    pm = bfx.prepare_qat(model, bfx.ternary(), example_inputs=(x,) if with_examples else None)
    bfx.disable_fake_quant(pm)
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-6)
        assert torch.allclose(pm(x, mask=None), model(x), atol=1e-6)
    mask = torch.rand(3, 16) > 0.5
    with pytest.raises(bfx.CaptureError, match=r"captured without 'mask'.*example_inputs"):
        pm(x, mask)
    bfx.enable_fake_quant(pm)
    cm = bfx.convert(pm.eval())
    assert cm(x).shape == (3, 4)


def test_optional_input_given_in_example_inputs_is_traced():
    torch.manual_seed(0)
    x, mask = torch.randn(3, 16), torch.rand(3, 16) > 0.5
    model = Masked()
    pm = bfx.disable_fake_quant(bfx.prepare_qat(model, bfx.ternary(), example_inputs=(x, mask)))
    with torch.no_grad():
        assert torch.allclose(pm(x, mask), model(x, mask), atol=1e-6)


def test_capture_error_points_at_the_users_line_and_names_a_none_input():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale=None):
            if x.sum() > 0:  # data-dependent: fx raises inside torch/fx/proxy.py
                x = x * scale
            return self.fc(x)

    with pytest.raises(bfx.CaptureError) as info:
        bfx.prepare_qat(Branchy(), bfx.ternary(), frontend="fx_whole")
    assert f"{__file__}:" in str(info.value) and "proxy.py" not in str(info.value)
    assert "traced with scale=None" in str(info.value)


def test_none_input_guard_survives_pickling_and_export():
    """torch.save re-traces a GraphModule on load: the guard must stay a node, not run on the Proxy."""
    import io

    x = torch.randn(3, 16)
    cm = bfx.convert(bfx.prepare_qat(Masked(), bfx.ternary()).eval())
    buf = io.BytesIO()
    torch.save(cm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), cm(x))
    with pytest.raises(bfx.CaptureError, match="captured without 'mask'"):
        loaded(x, torch.rand(3, 16) > 0.5)
    assert torch.equal(torch.export.export(cm, (x,)).module()(x), cm(x))
