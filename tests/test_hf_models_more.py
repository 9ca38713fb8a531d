"""More Hugging Face architectures on tiny random configs (issue 22): lone layers that model code reads
(Whisper's conv stride), parametrized weights (wav2vec2), nn.Linear subclasses (Falcon), weights read outside
their call (Mamba), a model that traces whole keeps its class (PoolFormer), and a summary that lists SigLIP's
nn.MultiheadAttention as float. Mixture-of-experts models: tests/test_hf_moe.py."""
import torch
from torch import nn

import bitlab_fx as bfx
from _hf_tiny import VOCAB, transformers as T

IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def _build(name):
    torch.manual_seed(0)
    llm = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    if name == "falcon":
        return T.FalconForCausalLM(T.FalconConfig(**llm, new_decoder_architecture=False)), (IDS,), {}
    if name == "mamba":
        cfg = T.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=1, expand=2)
        return T.MambaForCausalLM(cfg), (IDS,), {}
    if name == "whisper":
        cfg = T.WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                              max_source_positions=16, max_target_positions=32, decoder_start_token_id=1,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return T.WhisperForConditionalGeneration(cfg), (), {"input_features": torch.randn(2, 8, 32),
                                                            "decoder_input_ids": IDS[:, :6]}
    if name == "wav2vec2":
        cfg = T.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
        return T.Wav2Vec2ForCTC(cfg), (torch.randn(2, 800),), {}
    if name == "poolformer":
        cfg = T.PoolFormerConfig(num_channels=3, hidden_sizes=[16], depths=[1], num_encoder_blocks=1, patch_sizes=[7],
                                 strides=[4], padding=[2], pool_size=3, mlp_ratio=2.0, num_labels=3)
        return T.PoolFormerForImageClassification(cfg), (torch.randn(2, 3, 32, 32),), {}
    raise ValueError(name)


def _check_trains_converts_agrees(model, ex, kw):
    pm = bfx.prepare_qat(model, bfx.ternary(), ex, example_kwargs=kw or None)
    assert type(pm) is type(model)  # the class and its API stay
    out = pm(*ex, **kw)
    (out.logits.float().square().mean()).backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if n.endswith("proj.weight"))
    cm = bfx.convert(pm.eval())
    with torch.no_grad():
        a, b = pm(*ex, **kw).logits, cm(*ex, **kw).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
    return pm, cm


def _generates_alike(prepared, converted):
    prompt = IDS[:1, :4]
    assert torch.equal(converted.generate(prompt, max_new_tokens=3, do_sample=False),
                       prepared.generate(prompt, max_new_tokens=3, do_sample=False))


def test_falcon_linear_subclass_layers_are_quantized_and_generate():
    model, ex, kw = _build("falcon")
    n = sum(isinstance(m, nn.Linear) for m in model.modules())
    pm, cm = _check_trains_converts_agrees(model, ex, kw)
    assert bfx.summary(pm).totals["quantized"] == n == 5  # 4 FalconLinear + the head
    _generates_alike(pm, cm)


def test_mamba_weights_read_by_the_mixer_stay_float_and_generate():
    model, ex, kw = _build("mamba")
    pm, cm = _check_trains_converts_agrees(model, ex, kw)
    s = bfx.summary(pm)
    floats = {r["layer"] for r in s.rows if r["weight"] == "float"}
    assert floats == {"backbone.layers.0.mixer.conv1d", "backbone.layers.0.mixer.dt_proj"}
    assert all("read outside its layer call" in s.skipped[k] for k in floats)
    _generates_alike(pm, cm)


def test_whisper_conv_stride_is_read_from_lone_layers():
    model, ex, kw = _build("whisper")
    pm, cm = _check_trains_converts_agrees(model, ex, kw)
    enc = pm.model.encoder
    assert bfx.summary(pm).traced["model.encoder.conv1"] == "layer" and enc.conv1.stride == (1,) and enc.conv2.stride == (2,)


def test_wav2vec2_weight_norm_conv_stays_float_with_the_reason():
    model, ex, kw = _build("wav2vec2")
    pm, _ = _check_trains_converts_agrees(model, ex, kw)
    s = bfx.summary(pm)
    reasons = {k: why for k, (_, why) in s.float_weights.items()}
    assert "parametrized" in reasons["wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"]


def test_whole_traceable_hf_model_keeps_its_class():
    model, ex, kw = _build("poolformer")
    pm, cm = _check_trains_converts_agrees(model, ex, kw)
    assert "traces whole, kept as the PoolFormerForImageClassification" in bfx.summary(pm).untraced[""]
    assert pm(*ex, labels=torch.tensor([0, 2])).loss.isfinite() and cm.config.to_dict() == model.config.to_dict()
    whole = bfx.prepare_qat(_build("poolformer")[0], bfx.ternary(), frontend="fx_whole")
    assert isinstance(whole, torch.fx.GraphModule)  # the strict frontend: one graph


def test_siglip_multihead_attention_is_listed_float():
    torch.manual_seed(0)
    cfg = T.SiglipVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2)
    x = torch.randn(2, 3, 16, 16)
    pm = bfx.prepare_qat(T.SiglipVisionModel(cfg), bfx.ternary(), (x,))
    s = bfx.summary(pm)
    assert "nn.MultiheadAttention is not supported" in s.float_weights["head.attention.in_proj_weight"][1]
    cm = bfx.convert(pm.eval())
    with torch.no_grad():
        assert torch.allclose(cm(x).pooler_output, pm(x).pooler_output, atol=1e-4)
