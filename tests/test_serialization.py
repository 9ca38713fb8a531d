"""save_quantized / load_quantized: quantize once, rebuild on a fresh float model, clear errors."""
import json

import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from _hf_tiny import build, transformers
from _helpers import mlp


def _convert(model, ex, head):
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name(head, None)  # embeddings stay float by default
    return bfx.convert(bfx.prepare_qat(model, qc, ex).eval())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_round_trip_on_a_model_built_from_config(name, tmp_path):
    model, ex, _, head = build(name)
    cm = _convert(model, ex, head)
    path = str(tmp_path / "q.safetensors")
    bfx.save_quantized(cm, path)
    fresh = type(model)(model.config)  # random float weights: nothing trained, nothing downloaded
    loaded = bfx.load_quantized(fresh, path)
    assert type(loaded) is type(model) and bfx.summary(loaded).stage == "converted"
    assert not any(isinstance(m, nn.Linear) for n, m in loaded.named_modules() if n != head)
    with torch.no_grad():
        assert torch.equal(loaded(*ex).logits, cm(*ex).logits)
    prompt = ex[0][:1, :3]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=3, do_sample=False),
                       cm.generate(prompt, max_new_tokens=3, do_sample=False))


def test_round_trip_whole_graph_and_file_holds_packed_weights(tmp_path):
    torch.manual_seed(0)
    model = mlp((256, 256, 10))
    cm = bfx.convert(bfx.prepare_qat(model, bfx.ternary()).eval())
    path = str(tmp_path / "q.safetensors")
    bfx.save_quantized(cm, path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()["bitlab_fx"])
    assert "0.packed_weight" in keys and "0.weight" not in keys
    assert header["file_version"] == 2 and header["mapping"]["has_global"]
    loaded = bfx.load_quantized(mlp((256, 256, 10)), path)
    x = torch.randn(4, 256)
    assert torch.equal(loaded(x), cm(x))


def test_version_1_files_with_static_multipliers_still_load(tmp_path):
    """Files written before the static multiplier was renamed (file version 1: ``<layer>.act_scale_static``)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    static = bfx.QuantConfig(weight="ternary", input=bfx.IntActivation(dynamic=False, granularity="per_tensor"))
    relu4 = bfx.QuantConfig(output=bfx.IntActivation(4, signed=False, dynamic=False, granularity="per_tensor"))
    pm = bfx.prepare_qat(mlp((32, 32, 4)), bfx.QConfigMapping().set_global(static).set_object_type(nn.ReLU, relu4))
    pm.train()(torch.randn(16, 32))
    cm = bfx.convert(pm.eval())
    path, old_path = str(tmp_path / "q.safetensors"), str(tmp_path / "old.safetensors")
    bfx.save_quantized(cm, path)
    with safe_open(path, "pt") as f:
        def old_name(key):
            return key.replace("act_multiplier", "act_scale_static").replace("_output_multiplier", "_output_scale")
        tensors = {old_name(k): f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["bitlab_fx"])
    assert "0.act_scale_static" in tensors and "1_output_scale" in tensors
    save_file(tensors, old_path, metadata={"bitlab_fx": json.dumps({**header, "file_version": 1})})
    loaded = bfx.load_quantized(mlp((32, 32, 4)), old_path)
    x = torch.randn(5, 32)
    assert torch.equal(loaded(x), cm(x))


def test_errors_name_the_problem(tmp_path):
    model, ex, _, head = build("gpt2")
    cm = _convert(model, ex, head)
    path = str(tmp_path / "q.safetensors")
    with pytest.raises(bfx.ConvertError, match="is only prepared, not converted; call model = bfx.convert"):
        bfx.save_quantized(bfx.prepare_qat(model, bfx.ternary()), path)
    with pytest.raises(bfx.ConvertError, match=r"is a float model \(not prepared\), not converted"):
        bfx.save_quantized(mlp((8, 8)), path)
    bfx.save_quantized(cm, path)
    wider = type(model)(transformers.GPT2Config(vocab_size=96, n_embd=128, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(bfx.ConvertError, match=r"shape .* build the float model with the config"):
        bfx.load_quantized(wider, path)
    with pytest.raises(bfx.ConfigError, match="freshly built float model"):
        bfx.load_quantized(cm, path)
    # a file from another format version
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["bitlab_fx"])
    header["packing_version"] = 999
    save_file(load_file(path), path, metadata={"bitlab_fx": json.dumps(header)})
    with pytest.raises(bfx.ConvertError, match="packing format 999"):
        bfx.load_quantized(type(model)(model.config), path)
