"""bfx.export_onnx_decoder + OnnxDecoder: a converted causal LM decodes in onnxruntime with a KV cache and
produces the tokens bitlab_fx produces."""
import pytest
import torch

import bitlab_fx as bfx
from tests import _hf_tiny

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
ort.set_default_logger_severity(3)

from bitlab_fx.export import OnnxDecoder  # noqa: E402

FORMATS = {
    "llama": bfx.ternary(),
    "gpt2": bfx.QuantConfig(weight=bfx.IntWeight(4, granularity=bfx.PerGroup(32)), input="int8"),
}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def exported(request, tmp_path_factory):
    model, (ids,), _, _ = _hf_tiny.build(request.param)
    converted = bfx.convert(bfx.prepare_qat(model, FORMATS[request.param]).eval())
    path = tmp_path_factory.mktemp("decoder") / f"{request.param}.onnx"
    lowered = bfx.export_onnx_decoder(converted, path)
    return converted, ids, path, lowered


def test_the_file_is_one_cached_step_with_the_layers_as_matmul_nbits(exported):
    import onnx

    converted, _, path, lowered = exported
    layers = converted.config.num_hidden_layers
    graph = onnx.load(str(path)).graph
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits"] + [f"present.{i}.{k}" for i in range(layers)
                                                           for k in ("key", "value")]
    assert lowered and all(v.startswith("MatMulNBits") for v in lowered.values())
    nbits = [{a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"]
    quantized = [m for m in converted.modules() if isinstance(m, bfx.QuantizedLinear)]
    # every quantized weight runs as MatMulNBits (fused siblings as one node on their concatenated rows)
    assert sum(a["K"] * a["N"] for a in nbits) == sum(m.in_features * m.out_features for m in quantized)
    assert any(name.startswith("lm_head") for name in lowered)  # named as in the model (not the step wrapper)


def test_greedy_tokens_equal_the_converted_models_generate(exported):
    converted, ids, path, _ = exported
    decoder = OnnxDecoder(path, threads=2)
    prompt = ids[:, :7]  # a batch of 2 rows, no padding
    want = converted.generate(prompt, max_new_tokens=9, do_sample=False, min_new_tokens=9)
    assert torch.equal(decoder.greedy(prompt, 9), want)
    assert torch.equal(decoder.greedy(prompt[:1], 9), want[:1])


def test_prefill_logits_agree_with_the_converted_model(exported):
    converted, ids, path, _ = exported
    decoder = OnnxDecoder(path)
    got = decoder.prompt_logits(ids)
    with torch.no_grad():
        want = converted(ids).logits[:, -1:]  # the last position's: what decoding reads
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-2


def test_decoding_stops_when_every_row_has_produced_eos(exported):
    converted, ids, path, _ = exported
    decoder = OnnxDecoder(path)
    first = decoder.greedy(ids[:1, :7], 1)[0, -1].item()
    out = decoder.greedy(ids[:1, :7], 20, eos_token_id=first)
    assert out.shape[1] == 8 and out[0, -1].item() == first


def test_a_prepared_model_is_refused_with_what_to_do(tmp_path):
    model, _, _, _ = _hf_tiny.build("llama")
    with pytest.raises(bfx.ExportError, match="bfx.convert"):
        bfx.export_onnx_decoder(bfx.prepare_qat(model, bfx.ternary()), tmp_path / "m.onnx")


def test_a_model_that_does_not_decode_is_refused_by_name(tmp_path):
    model, _, _, _ = _hf_tiny.build("bert")
    converted = bfx.convert(bfx.prepare_qat(model, bfx.ternary()).eval())
    with pytest.raises(bfx.ExportError, match="BertForSequenceClassification.*bfx.export_onnx"):
        bfx.export_onnx_decoder(converted, tmp_path / "m.onnx")


def test_a_file_without_a_cache_and_bad_prompts_are_refused(tmp_path, exported):
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 16))
    path = tmp_path / "mlp.onnx"
    bfx.export_onnx(bfx.convert(bfx.prepare_qat(mlp, bfx.ternary()).eval()), path, (torch.randn(2, 16),))
    with pytest.raises(bfx.ExportError, match="export_onnx_decoder"):
        OnnxDecoder(path)
    decoder = OnnxDecoder(exported[2])
    with pytest.raises(bfx.ExportError, match=r"\[batch, seq\].*\(5,\)"):
        decoder.greedy(torch.arange(5), 3)


def test_all_logits_gives_every_positions_logits_for_scoring(tmp_path):
    model, (ids,), _, _ = _hf_tiny.build("gpt2")
    converted = bfx.convert(bfx.prepare_qat(model, bfx.ternary()).eval())
    path = tmp_path / "scoring.onnx"
    bfx.export_onnx_decoder(converted, path, all_logits=True)
    decoder = OnnxDecoder(path)
    got = decoder.prompt_logits(ids)
    with torch.no_grad():
        want = converted(ids).logits
    assert got.shape == want.shape and ((got - want).abs().max() / want.abs().max()).item() <= 1e-2
    assert torch.equal(decoder.greedy(ids[:1, :5], 4), converted.generate(ids[:1, :5], max_new_tokens=4,
                                                                           do_sample=False, min_new_tokens=4))
