"""The lean engine (bitlab_fx/lean): greedy_decode's tokens on converted Llama/Qwen2/Mistral models are HF
generate's, and its logits are HF forward's up to float rounding."""
import warnings

import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.lean import lean_decoder

from _lean_tiny import convert, hf_greedy, prompt, tiny

CASES = {
    "llama-gqa-ternary": lambda: convert(tiny("Llama")),
    "llama-int4-attention-bias": lambda: convert(tiny("Llama", attention_bias=True, mlp_bias=True), "int4"),
    "qwen2-biases-int8": lambda: convert(tiny("Qwen2"), "int8"),
    "mistral-ternary": lambda: convert(tiny("Mistral")),
    "llama-tied-int8-embedding": lambda: convert(tiny("Llama", tie_word_embeddings=True), "ternary",
                                                 embedding=bfx.weight_only(bfx.IntWeight(8))),
    "llama-rope-llama3": lambda: convert(tiny("Llama", rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lean_greedy_gives_generates_tokens(case):
    model = CASES[case]()
    assert bfx.lean_fallback_reason(model) is None
    ids = prompt()
    want = hf_greedy(model, ids, 12)
    assert torch.equal(bfx.greedy_decode(model, ids, 12, engine="lean"), want)
    assert torch.equal(bfx.greedy_decode(model, ids[:, :4], 5), hf_greedy(model, ids[:, :4], 5))  # kept cache, reused


def test_lean_logits_are_hf_forwards_up_to_float_rounding():
    # Each step's logits against HF's forward on the whole sequence (logit scale ~0.6). The arithmetic is HF's
    # except attention (explicit matmuls for one query, SDPA for a prompt: another summation order), so they
    # differ by float rounding, ~1e-7 here; 1e-4 allows for that but not for one int8 activation code rounding
    # the other way (~1e-2 on these logits).
    model = convert(tiny("Qwen2"))
    seq = hf_greedy(model, prompt(), 10)[0]
    with torch.inference_mode():
        full = model(seq[None]).logits[0]
        decoder, reason = lean_decoder(model, len(seq))
        assert reason is None
        got = [decoder.forward(seq[:10], 0)] + [decoder.forward(seq[t:t + 1], t) for t in range(10, len(seq))]
    torch.testing.assert_close(torch.stack(got), full[9:], atol=1e-4, rtol=0)


def test_lean_stops_at_eos():
    model = convert(tiny("Llama"))
    ids = prompt()
    first = int(bfx.greedy_decode(model, ids, 1, engine="lean")[0, -1])
    out = bfx.greedy_decode(model, ids, 8, eos_token_id=first, engine="lean")
    assert out.shape == (1, ids.shape[1] + 1) and int(out[0, -1]) == first


@pytest.mark.parametrize("case", ["llama-gqa-ternary", "qwen2-biases-int8"])
def test_compiled_lean_step_gives_the_eager_lean_tokens(case):
    """engine="lean-compiled": the one-token step compiled (fixed shapes, attention over the whole cache with the
    later positions masked): generate's tokens, and the cache it keeps is reused by a later, shorter call."""
    model = CASES[case]()
    ids = prompt()
    want = hf_greedy(model, ids, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the eager step
        assert torch.equal(bfx.greedy_decode(model, ids, 10, engine="lean-compiled"), want)
        assert torch.equal(bfx.greedy_decode(model, ids[:, :4], 5, engine="lean-compiled"), hf_greedy(model, ids[:, :4], 5))


def test_compiled_lean_step_logits_match_the_eager_step():
    model = convert(tiny("Llama"))
    ids = prompt()[0]
    decoder, _ = lean_decoder(model, 32)
    with torch.inference_mode():
        decoder.forward(ids, 0)
        eager = decoder.forward(ids[:1], len(ids))
        decoder.forward(ids, 0)  # the same cache contents again
        static = decoder.step(ids[:1], torch.tensor([len(ids)]))
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-5)  # softmax over zeros added: float rounding apart


def test_compiled_lean_step_falls_back_with_a_warning_when_compiling_fails(monkeypatch):
    real_compile = torch.compile

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, **{**kwargs, "backend": broken_backend}))
    model = CASES["mistral-ternary"]()
    ids = prompt()
    with pytest.warns(RuntimeWarning, match="compiling the lean step failed"):
        out = bfx.greedy_decode(model, ids, 6, engine="lean-compiled")
    assert torch.equal(out, hf_greedy(model, ids, 6))
