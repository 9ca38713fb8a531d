"""examples/qat_pretrained_lm.py's code path on a tiny random Llama: PTQ and distillation QAT rows, the curves,
converted == prepared perplexity, checkpoint files written."""
import importlib.util
import json
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("qat_pretrained_lm_example", ROOT / "examples" / "qat_pretrained_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qat_pretrained_lm_tiny_run(tmp_path, capsys):
    out = tmp_path / "qat_llm.json"
    record = _example().main(["--model", "tiny", "--formats", "w4a8", "--steps", "2", "--eval-every", "1",
                              "--seq", "16", "--batch", "2", "--eval-tokens", "64", "--decode-tokens", "3",
                              "--bench-lock", "", "--keep-malloc-defaults", "--checkpoint-dir", str(tmp_path / "ck"), "--json", str(out)])
    rows = {r["model"]: r for r in record["rows"]}
    assert set(rows) == {"fp32", "w4a8 PTQ", "w4a8 QAT"}
    qat = rows["w4a8 QAT"]
    assert qat["steps"] == 2 and qat["tokens"] == 2 * 2 * 16
    assert abs(qat["converted ppl"] - qat["ppl"]) <= 0.005 * qat["ppl"]
    assert rows["w4a8 PTQ"]["MB"] < rows["fp32"]["MB"] and math.isfinite(qat["recovered"])
    saved = json.loads(out.read_text())
    assert [p[0] for p in saved["curves"]["w4a8"]["ppl_vs_tokens"]] == [32, 64]
    assert (tmp_path / "ck" / "w4a8.pt").exists()
    assert "w4a8 QAT" in capsys.readouterr().out


def test_weight_only_layers_keep_int8_weights_with_float_inputs():
    import bitlab_fx as bfx

    example = _example()
    model, _ = example.tiny_llama()
    converted = bfx.convert(example.prepare(model, "w8a8", "", r".*\.down_proj|lm_head").eval())
    acts = {name: m.act for name, m in converted.named_modules() if isinstance(m, bfx.nn.QuantizedLinear)}
    kept = {name for name, act in acts.items() if act == "none"}
    assert kept == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"} | {n for n in acts if n.startswith("lm_head")}
    assert any(n.startswith("lm_head") for n in kept) and len(kept) < len(acts)
    assert all(act == "per_token" for name, act in acts.items() if name not in kept)
