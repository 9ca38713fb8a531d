"""bfx.compile_for_decode (decode.py): a converted HF causal LM decoding with a static KV cache and a compiled
forward gives the tokens the eager converted model gives; compile failures fall back with a warning."""
import copy

import pytest
import torch

import bitlab_fx as bfx

_hf_tiny = pytest.importorskip("_hf_tiny")


def _convert(name):
    model, (ids,), _, _ = _hf_tiny.build(name)
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("lm_head", bfx.int8())
    return bfx.convert(bfx.prepare_qat(model.eval(), qc).eval()), ids[:1]


@pytest.fixture(scope="module")
def converted():
    return _convert("llama")


def _greedy(model, ids, n=6):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def test_compiled_decode_gives_the_eager_tokens(converted):
    cm, ids = converted
    want = _greedy(cm, ids)
    fast = bfx.compile_for_decode(copy.deepcopy(cm))
    assert fast.generation_config.cache_implementation == "static"
    assert torch.equal(_greedy(fast, ids), want)
    assert torch.equal(_greedy(fast, ids), want)  # the compiled graphs, reused
    twin = copy.deepcopy(fast)  # the compiled forward follows the copy
    assert twin.forward.__self__ is twin and torch.equal(_greedy(twin, ids), want)


@pytest.mark.parametrize("name", ["qwen2", "mistral", "gpt2"])
def test_other_decoders_compile_to_the_same_tokens(name):
    cm, ids = _convert(name)
    want = _greedy(cm, ids, n=4)
    assert torch.equal(_greedy(bfx.compile_for_decode(cm), ids, n=4), want)


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(converted):
    cm, ids = converted
    want = _greedy(cm, ids)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    fast = bfx.compile_for_decode(copy.deepcopy(cm), backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="compiling LlamaForCausalLM.forward failed, decoding eagerly"):
        got = _greedy(fast, ids)
    assert torch.equal(got, want)


def test_refuses_what_it_cannot_compile(converted):
    model, _, _, _ = _hf_tiny.build("llama")
    with pytest.raises(bfx.ConvertError, match="not a converted bitlab_fx model"):
        bfx.compile_for_decode(model)
    mlp = bfx.convert(bfx.prepare_qat(torch.nn.Sequential(torch.nn.Linear(8, 8)), bfx.ternary()).eval())
    with pytest.raises(bfx.ConvertError, match="no Hugging Face generate"):
        bfx.compile_for_decode(mlp)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_decode_gives_generates_tokens_eager_and_compiled(name):
    cm, ids = _convert(name)
    want = _greedy(cm, ids, n=5)
    assert torch.equal(bfx.greedy_decode(cm, ids, 5), want)
    assert torch.equal(bfx.greedy_decode(cm, ids, 5), want)  # the kept cache, reset
    fast = bfx.compile_for_decode(copy.deepcopy(cm))
    assert torch.equal(bfx.greedy_decode(fast, ids, 5), want)  # later steps check only the graphs' differences
    assert torch.equal(bfx.greedy_decode(fast, ids, 5, recheck_guards=True), want)
    two = torch.cat([ids, ids.flip(1)])
    assert torch.equal(bfx.greedy_decode(cm, two, 3), _greedy(cm, two, n=3))


def test_greedy_decode_stops_at_eos_and_refuses_bad_input(converted):
    cm, ids = converted
    first = int(bfx.greedy_decode(cm, ids, 1)[0, -1])
    assert bfx.greedy_decode(cm, ids, 8, eos_token_id=first).shape[1] == ids.shape[1] + 1
    with pytest.raises(bfx.ConvertError, match="int64"):
        bfx.greedy_decode(cm, ids.float(), 3)
    with pytest.raises(bfx.ConvertError, match="at least one"):
        bfx.greedy_decode(cm, ids, 0)
    with pytest.raises(bfx.ConvertError, match="not a Hugging Face causal LM"):
        bfx.greedy_decode(torch.nn.Linear(2, 2), ids, 2)


def test_single_token_steps_go_to_their_own_compiled_function():
    from bitlab_fx.decode import _is_decode_step

    assert _is_decode_step((torch.zeros(2, 1, dtype=torch.long),), {})
    assert _is_decode_step((), {"input_ids": torch.zeros(1, 1, dtype=torch.long)})
    assert not _is_decode_step((torch.zeros(1, 7, dtype=torch.long),), {})
    assert not _is_decode_step((), {"inputs_embeds": torch.zeros(1, 1, 8)})
