"""prepare_qat(..., example_kwargs=): keyword example inputs (an attention_mask) on the fx and export frontends."""
import pytest
import torch
from torch import nn

import bitlab_fx as bfx

FRONTENDS = ["fx", "fx_whole", "export"]


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x, mask=None):
        h = torch.relu(self.fc(x))
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.out(h.sum(1))


def _inputs(batch=2):
    x, mask = torch.randn(batch, 5, 8), torch.ones(batch, 5)
    mask[0, 3:] = 0  # padding
    return x, mask


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_keyword_mask_is_traced_as_an_input(frontend):
    torch.manual_seed(0)
    model, (x, mask) = Masked(), _inputs()
    pm = bfx.prepare_qat(model, bfx.ternary(), (x,), example_kwargs={"mask": mask}, frontend=frontend)
    assert [n.name for n in pm.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    bfx.disable_fake_quant(pm.eval())
    x3, mask3 = _inputs(3)  # another batch size: the export frontend's default dynamic batch covers the kwarg too
    with torch.no_grad():
        for a, m in [(x, mask), (x3, mask3)]:
            assert torch.allclose(pm(a, mask=m), model(a, mask=m), atol=1e-5)
        assert not torch.allclose(pm(x, mask=mask), model(x), atol=1e-3)  # the mask is used, not baked in as None
    bfx.enable_fake_quant(pm)
    cm = bfx.convert(pm)
    with torch.no_grad():
        assert torch.allclose(cm(x, mask=mask), pm(x, mask=mask), atol=1e-5)
        assert cm(x3, mask=mask3).shape == (3, 3)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_only_keyword_inputs(frontend):
    torch.manual_seed(0)
    model, (x, mask) = Masked(), _inputs()
    pm = bfx.disable_fake_quant(bfx.prepare_qat(model, bfx.ternary(), example_kwargs={"x": x, "mask": mask},
                                                frontend=frontend).eval())
    with torch.no_grad():
        assert torch.allclose(pm(x=x, mask=mask), model(x, mask), atol=1e-5)


def test_export_takes_dynamic_shapes_keyed_by_parameter_name():
    torch.manual_seed(0)
    model, (x, mask) = Masked(), _inputs()
    batch = torch.export.Dim("batch")
    pm = bfx.prepare_qat(model, bfx.ternary(), (x,), example_kwargs={"mask": mask}, frontend="export",
                         dynamic_shapes={"x": {0: batch}, "mask": {0: batch}})
    x4, mask4 = _inputs(4)
    assert pm(x4, mask=mask4).shape == (4, 3)


def test_empty_example_kwargs_is_none():
    torch.manual_seed(0)
    model, (x, mask) = Masked(), _inputs()
    pm = bfx.prepare_qat(model, bfx.ternary(), (x,), example_kwargs={})
    with pytest.raises(bfx.CaptureError, match=r"captured without 'mask'.*example_kwargs"):
        pm(x, mask=mask)


class _Untraceable(nn.Module):
    """Data-dependent branch at the root: the fx frontend traces the parts, checking them on the recorded call."""

    def __init__(self):
        super().__init__()
        self.body = Masked()

    def forward(self, x, mask=None):
        if x.sum() > 1e9:
            x = x * 0
        return self.body(x, mask=mask)


def test_partial_tracing_runs_the_model_with_example_kwargs():
    torch.manual_seed(0)
    model, (x, mask) = _Untraceable(), _inputs()
    pm = bfx.prepare_qat(model, bfx.ternary(), (x,), example_kwargs={"mask": mask})
    assert type(pm) is _Untraceable and bfx.summary(pm).traced == {"body": "graph"}
    bfx.disable_fake_quant(pm.eval())
    with torch.no_grad():
        assert torch.allclose(pm(x, mask=mask), model(x, mask=mask), atol=1e-5)

    class Strict(_Untraceable):  # fails without its mask: the example run must pass it
        def forward(self, x, mask=None):
            assert mask is not None
            return super().forward(x, mask)

    with pytest.raises(bfx.CaptureError, match="example_inputs"):
        bfx.prepare_qat(Strict(), bfx.ternary(), (x,), frontend="fx")
    bfx.prepare_qat(Strict(), bfx.ternary(), (x,), example_kwargs={"mask": mask}, frontend="fx")


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_bad_example_kwargs(frontend):
    model, (x, mask) = Masked(), _inputs()
    with pytest.raises(bfx.ConfigError, match="example_kwargs must be a dict.*got list"):
        bfx.prepare_qat(model, bfx.ternary(), (x,), example_kwargs=[mask], frontend=frontend)
    with pytest.raises(bfx.ConfigError, match=r"'maks' is not a parameter of Masked.forward\(x, mask\)"):
        bfx.prepare_qat(model, bfx.ternary(), (x,), example_kwargs={"maks": mask}, frontend=frontend)
    with pytest.raises(bfx.ConfigError, match="'mask' is given twice, in example_inputs"):
        bfx.prepare_qat(model, bfx.ternary(), (x, mask), example_kwargs={"mask": mask}, frontend=frontend)
    with pytest.raises(bfx.ConfigError, match="example_inputs must be a tuple"):
        bfx.prepare_qat(model, bfx.ternary(), [x], example_kwargs={"mask": mask}, frontend=frontend)


def test_forward_with_var_keyword_accepts_other_keys():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, **kwargs):
            return self.fc(x) * kwargs["scale"]

    x = torch.randn(2, 8)
    pm = bfx.prepare_qat(Kw(), bfx.ternary(), (x,), example_kwargs={"scale": torch.ones(2, 1)}, frontend="export")
    assert pm(x, scale=torch.ones(2, 1)).shape == (2, 8)


def test_load_quantized_takes_example_kwargs(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model, (x, mask) = Masked(), _inputs()
    cm = bfx.convert(bfx.prepare_qat(model, bfx.ternary(), (x,), example_kwargs={"mask": mask}).eval())
    path = str(tmp_path / "q.safetensors")
    bfx.save_quantized(cm, path)
    loaded = bfx.load_quantized(Masked(), path, (x,), example_kwargs={"mask": mask})
    with torch.no_grad():
        assert torch.equal(loaded(x, mask=mask), cm(x, mask=mask))
    with pytest.raises(bfx.ConfigError, match="load_quantized: example_kwargs key 'maks'"):
        bfx.load_quantized(Masked(), path, (x,), example_kwargs={"maks": mask})


# ---- a tiny Hugging Face model with a padded attention_mask (no downloads)

@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_attention_mask(name, frontend):
    from _hf_tiny import build

    model, ex, _, head = build(name)
    model.config.use_cache = False
    ids = ex[0]
    am = torch.ones_like(ids)
    am[1, :4] = 0  # row 1 left-padded
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name(head, None)
    pm = bfx.prepare_qat(model, qc, example_inputs=(ids,), example_kwargs={"attention_mask": am}, frontend=frontend)
    if frontend == "fx":
        assert type(pm) is type(model)
    else:
        assert [n.name for n in pm.graph.nodes if n.op == "placeholder"][-2:] == ["input_ids", "attention_mask"]

    def logits(m, ids, **kw):
        with torch.no_grad():
            out = m(ids, **kw)
        return out[0] if isinstance(out, (tuple, list)) else out.logits

    model.eval()
    bfx.disable_fake_quant(pm.eval())
    ref = logits(model, ids, attention_mask=am)
    assert torch.allclose(logits(pm, ids, attention_mask=am), ref, atol=1e-5)
    assert not torch.allclose(logits(model, ids), ref, atol=1e-3)  # the padding matters
    ids3 = torch.randint(0, 96, (3, ids.shape[1]))
    am3 = torch.ones_like(ids3)
    am3[0, :2] = 0
    assert torch.allclose(logits(pm, ids3, attention_mask=am3), logits(model, ids3, attention_mask=am3), atol=1e-5)
    bfx.enable_fake_quant(pm)
    cm = bfx.convert(pm)
    a, b = logits(pm, ids, attention_mask=am), logits(cm, ids, attention_mask=am)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
