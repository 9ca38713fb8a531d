"""Hugging Face models that torch.fx cannot trace whole: partial tracing, QAT with labels=, convert, generate."""
import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from _hf_tiny import build, transformers


def _qc(head):
    return bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name(head, None)


def _float_layers(model):
    conv1d = transformers.pytorch_utils.Conv1D
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, conv1d))]


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_prepare_train_convert_generate(name):
    model, ex, labels, head = build(name)
    n_layers = len(_float_layers(model))
    pm = bfx.prepare_qat(model, _qc(head), example_inputs=ex)
    assert type(pm) is type(model) and pm.config.to_dict() == model.config.to_dict()  # same class, HF API
    s = bfx.summary(pm)
    assert s.totals["layers"] == n_layers and s.totals["quantized"] == n_layers - 1
    assert s.untraced[""] and "graph" in s.traced.values()  # root did not trace; some blocks did
    assert set(model.state_dict()) <= set(pm.state_dict())  # parameter names unchanged
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    before = pm.get_input_embeddings().weight.detach().clone()
    for _ in range(2):
        loss = pm(*ex, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss) and not torch.equal(before, pm.get_input_embeddings().weight)
    pm.eval()
    cm = bfx.convert(pm)
    assert type(cm) is type(model)
    assert _float_layers(cm) == [head]  # every Linear/Conv1D but the excluded head was lowered
    assert sum(isinstance(m, bfx.QuantizedLinear) for m in cm.modules()) == n_layers - 1
    with torch.no_grad():
        a, b = pm(*ex).logits, cm(*ex).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
    if name != "bert":
        prompt = ex[0][:1, :4]
        out = cm.generate(prompt, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 8)
        assert torch.equal(out, pm.generate(prompt, max_new_tokens=4, do_sample=False))
    with pytest.raises(bfx.ConvertError, match="already converted"):
        bfx.convert(cm)


def test_mapping_rules_see_original_names():
    model, ex, _, head = build("llama")
    qc = _qc(head).set_module_name("model.layers.0.mlp.down_proj", bfx.int8()) \
        .set_module_name_regex(r"model\.layers\.1\.self_attn\.[qk]_proj", None)
    cm = bfx.convert(bfx.prepare_qat(model, qc, ex).eval())
    rows = {r["layer"]: r for r in bfx.summary(cm).rows}
    assert rows["model.layers.0.mlp.down_proj"]["weight"] == "int8"  # inside a traced graph
    assert rows["model.layers.1.self_attn.q_proj"]["weight"] == "float"  # a lone layer, excluded by regex
    assert rows["model.layers.1.self_attn.v_proj"]["weight"] == "ternary"
    assert "module_name_regex" in rows["model.layers.1.self_attn.k_proj"]["rule"]


def test_summary_says_what_did_not_trace_and_why():
    model, ex, _, head = build("gpt2")
    text = str(bfx.summary(bfx.prepare_qat(model, _qc(head), ex)))
    assert "transformer.h.0.mlp" in text and "not traced" in text and "transformer.h.0.attn:" in text


def test_not_prepared_errors_still_clear():
    model, *_ = build("gpt2")
    with pytest.raises(bfx.ConvertError, match="not prepared"):
        bfx.convert(model)
    pm = bfx.prepare_qat(model, bfx.ternary())
    with pytest.raises(bfx.ConfigError, match="already prepared"):
        bfx.prepare_qat(pm, bfx.ternary())


def test_prepared_hf_model_save_pretrained_round_trip(tmp_path):
    model, ex, _, head = build("llama")
    pm = bfx.prepare_qat(model, _qc(head), ex)
    pm.save_pretrained(tmp_path)  # a float checkpoint with the original names
    again = type(model).from_pretrained(tmp_path)
    with torch.no_grad():
        bfx.disable_fake_quant(pm)
        assert torch.allclose(pm(*ex).logits, again(*ex).logits, atol=1e-5)


def test_converted_hf_model_save_pretrained_points_to_save_quantized(tmp_path):
    import pickle
    model, ex, _, head = build("llama")
    cm = bfx.convert(bfx.prepare_qat(model, _qc(head), ex).eval())
    with pytest.raises(bfx.ConvertError, match=r"save_pretrained: this LlamaForCausalLM is converted.*bfx.save_quantized"):
        cm.save_pretrained(tmp_path)
    bfx.save_quantized(cm, str(tmp_path / "m.safetensors"))  # the supported way
    assert torch.equal(pickle.loads(pickle.dumps(cm))(*ex).logits, cm(*ex).logits)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "vit", "t5"])
def test_more_architectures_prepare_and_convert(name):
    model, ex, labels, head = build(name)
    kwargs = {"decoder_input_ids": labels} if name == "t5" else {}
    inputs = ex if ex is not None else (labels,)
    pm = bfx.prepare_qat(model, _qc(head), ex)
    pm(*inputs, labels=labels).loss.backward()
    pm.eval()
    cm = bfx.convert(pm)
    assert bfx.summary(cm).totals["quantized"] == len(_float_layers(model)) - 1
    with torch.no_grad():
        a, b = pm(*inputs, **kwargs).logits, cm(*inputs, **kwargs).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4


def test_gpt2_conv1d_float_state_dict_loads_into_prepared():
    model, ex, _, head = build("gpt2")
    pm = bfx.prepare_qat(model, _qc(head), ex)
    sd = model.state_dict()
    assert pm.state_dict()["transformer.h.0.attn.c_attn.weight"].shape == sd["transformer.h.0.attn.c_attn.weight"].shape
    pm.load_state_dict(sd)


def test_converted_hf_model_compiles_fullgraph():
    model, ex, _, head = build("llama")
    cm = bfx.convert(bfx.prepare_qat(model, _qc(head), ex).eval())
    torch._dynamo.reset()
    compiled = torch.compile(cm, fullgraph=True, backend="aot_eager")  # a graph break would raise
    with torch.no_grad():
        assert torch.allclose(compiled(*ex).logits, cm(*ex).logits, atol=1e-5)
