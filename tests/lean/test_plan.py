"""What the lean engine refuses (bitlab_fx/lean/plan.py), and that greedy_decode then decodes with the model's
forward: the same tokens as generate, a warning only when engine="lean" was asked for."""
import warnings

import pytest
import torch

import bitlab_fx as bfx

from _lean_tiny import convert, hf_greedy, prompt, tiny

_hf_tiny = pytest.importorskip("_hf_tiny")


def _falls_back(model, reason_match, ids=None, n=4):
    """The reason matches; engine="lean" warns with it and gives generate's tokens; "auto" does not warn."""
    ids = prompt() if ids is None else ids
    with pytest.warns(RuntimeWarning, match="lean engine does not decode"):
        got = bfx.greedy_decode(model, ids, n, engine="lean")
    assert torch.equal(got, hf_greedy(model, ids, n))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bfx.greedy_decode(model, ids, n)


def test_unconverted_and_other_architectures_fall_back():
    float_model = tiny("Llama")
    assert "not converted" in bfx.lean_fallback_reason(float_model)
    prepared = bfx.prepare_qat(tiny("Llama"), bfx.ternary())
    assert "not converted" in bfx.lean_fallback_reason(prepared)
    gpt2 = _hf_tiny.build("gpt2")[0]
    assert "GPT2LMHeadModel is not one of the lean decoder's architectures" in bfx.lean_fallback_reason(gpt2)
    _falls_back(float_model, "not converted")


def test_a_layer_left_float_falls_back_with_its_name():
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("model.layers.1.mlp.down_proj", None)
    model = bfx.convert(bfx.prepare_qat(tiny("Llama"), qc).eval())
    assert bfx.lean_fallback_reason(model) == ("model.layers.1.mlp.down_proj is not a converted layer (left float or "
                                               "excluded by the mapping)")
    _falls_back(model, "down_proj")


def test_length_dependent_rope_falls_back():
    model = convert(tiny("Llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
    assert "rotary type 'dynamic' changes its frequencies" in bfx.lean_fallback_reason(model)


def test_sequences_longer_than_the_sliding_window_fall_back():
    model = convert(tiny("Mistral", sliding_window=12))
    ids = prompt(10)
    assert bfx.lean_fallback_reason(model, length=12) is None
    assert "16 positions exceed the sliding window of 12" in bfx.lean_fallback_reason(model, length=16)
    _falls_back(model, "sliding window", ids, n=6)


def test_batches_fall_back_to_the_forward():
    model = convert(tiny("Qwen2"))
    two = torch.cat([prompt(seed=1), prompt(seed=2)])
    assert "a batch of 2 rows" in bfx.lean_fallback_reason(model, batch=2)
    _falls_back(model, "batch", two)


def test_engine_hf_skips_the_lean_engine_and_bad_engines_are_refused():
    model = convert(tiny("Llama"))
    ids = prompt()
    assert torch.equal(bfx.greedy_decode(model, ids, 4, engine="hf"), hf_greedy(model, ids, 4))
    assert "_bitlab_lean_decoder" not in model.__dict__
    with pytest.raises(bfx.ConvertError, match="engine='fast'; use one of 'auto', 'lean', 'lean-compiled', 'hf'"):
        bfx.greedy_decode(model, ids, 4, engine="fast")


def test_a_moved_model_is_planned_again():
    model = convert(tiny("Llama"))
    ids = prompt()
    bfx.greedy_decode(model, ids, 3)
    first = model.__dict__["_bitlab_lean_plan"][1]
    model.to(torch.float32)  # (same tensors: the plan is kept)
    bfx.greedy_decode(model, ids, 3)
    assert model.__dict__["_bitlab_lean_plan"][1] is first
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight * 2)
    assert torch.equal(bfx.greedy_decode(model, ids, 5), hf_greedy(model, ids, 5))
    assert model.__dict__["_bitlab_lean_plan"][1] is not first
