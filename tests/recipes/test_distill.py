"""bfx.recipes.distill on tiny random Hugging Face decoders: resume after an interruption, loss parts, teacher cache,
gradient checkpointing and bf16 autocast on the prepared model, config errors."""
import copy

import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.recipes import DistillConfig, TeacherCache, distill

from _hf_tiny import VOCAB, build

DECODERS = ["llama", "qwen2", "mistral", "gpt2", "phi3"]


def _student(model, spec=None):
    qmap = bfx.QConfigMapping().set_global(spec or bfx.ternary()).set_module_name("lm_head", bfx.int8())
    return bfx.prepare_qat(copy.deepcopy(model), qmap)


def _batches(n=8, batch=2, seq=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


class Interrupted(Exception):
    pass


def _interrupt_at(step_to_fail):
    def callback(step, entry):
        if step == step_to_fail:
            raise Interrupted
    return callback


def test_resumed_run_matches_uninterrupted(tmp_path):
    model = build("llama")[0]
    data = _batches()
    config = dict(steps=4, lr=1e-3, grad_accum=2, quant_ramp_steps=2, lm_weight=0.5, checkpoint_every=2)
    whole = _student(model)
    full = distill(whole, model, data, DistillConfig(**config, checkpoint=str(tmp_path / "a.pt")))

    resumed = _student(model)
    cfg = DistillConfig(**config, checkpoint=str(tmp_path / "b.pt"))
    with pytest.raises(Interrupted):  # killed after step 3: the last checkpoint is step 2's
        distill(resumed, model, data, cfg, callback=_interrupt_at(3))
    again = _student(model)  # a new process would rebuild the student from the float model
    second = distill(again, model, data, cfg)

    assert second.resumed_from == 2 and second.steps_done == 4
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full.history]
    for (name, a), b in zip(whole.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_loss_parts_and_history():
    model = build("llama")[0]
    student = _student(model)
    cfg = DistillConfig(steps=3, lr=1e-3, temperature=2.0, lm_weight=0.3, hidden_weight=0.2, lr_warmup_steps=1)
    result = distill(student, model, _batches(), cfg)
    first = result.history[0]
    assert set(first) >= {"step", "loss", "kl", "lm", "hidden", "lr", "mix", "tokens"}
    assert first["loss"] == pytest.approx(first["kl"] + 0.3 * first["lm"] + 0.2 * first["hidden"], rel=1e-5)
    assert [h["tokens"] for h in result.history] == [32, 64, 96]


def test_float_student_starts_at_zero_kl():
    model = build("llama")[0]
    result = distill(copy.deepcopy(model), model, _batches(), DistillConfig(steps=1, lr=1e-4))
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_teacher_cache_runs_teacher_once_per_batch(tmp_path):
    model = build("llama")[0]
    student, calls = _student(model), []
    model.register_forward_hook(lambda *_: calls.append(1))
    data = _batches(n=2)
    cache = TeacherCache(str(tmp_path / "teacher"))
    result = distill(student, model, data, DistillConfig(steps=4, lr=1e-3), teacher_cache=cache)
    assert len(calls) == 2 and result.steps_done == 4  # two epochs over two batches


@pytest.mark.parametrize("name", DECODERS)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model, (ids,), _, _ = build(name)
    plain, checkpointed = _student(model), _student(model)
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5.x
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    grads = []
    for student in (plain, checkpointed):
        student.train()
        torch.manual_seed(0)  # the same dropout masks (GPT-2 has dropout)
        student(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


@pytest.mark.parametrize("name", DECODERS)
def test_bf16_autocast_training_and_convert(name):
    model, (ids,), _, _ = build(name)
    student = _student(model, bfx.QuantConfig(weight=bfx.IntWeight(4, granularity="per_group:32"), input="int8"))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = distill(student, model, _batches(n=2), DistillConfig(steps=2, lr=1e-3, autocast="bf16"))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    converted = bfx.convert(student.eval())
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, student(ids).logits)


@pytest.mark.parametrize("bad, words", [
    (dict(steps=0), "steps"), (dict(steps=2, lr_schedule="step"), "lr_schedule"),
    (dict(steps=2, autocast="int8"), "autocast"), (dict(steps=2, kl_weight=0.0), "not all 0"),
    (dict(steps=2, grad_accum=0), "grad_accum"),
])
def test_bad_config_is_a_config_error(bad, words):
    with pytest.raises(bfx.ConfigError, match=words):
        DistillConfig(**bad)


def test_hidden_loss_with_cache_or_tensor_model_is_a_config_error(tmp_path):
    model = build("llama")[0]
    student = _student(model)
    with pytest.raises(bfx.ConfigError, match="TeacherCache"):
        distill(student, model, _batches(), DistillConfig(steps=1, hidden_weight=1.0),
                teacher_cache=TeacherCache(str(tmp_path)))
    with pytest.raises(bfx.ConfigError, match="no trainable"):
        distill(student.requires_grad_(False), model, _batches(), DistillConfig(steps=1))


def test_compiled_steps_follow_the_eager_run(tmp_path):
    """DistillConfig(compile=True): the ramp runs eagerly, the later steps through bfx.compile; losses and weights
    are the eager run's to float rounding, and the checkpoint holds the student's own state_dict."""
    model = build("llama")[0]
    data = _batches()
    config = dict(steps=4, lr=1e-3, quant_ramp_steps=2, progress_every=10)
    eager = distill(_student(model), model, data, DistillConfig(**config))
    student = _student(model)
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = distill(student, model, data, DistillConfig(**config, compile=True, checkpoint=str(tmp_path / "c.pt")))
    assert counters["stats"]["unique_graphs"] > graphs_before  # the steps at mix 1 went through torch.compile
    assert [h["mix"] for h in compiled.history] == [h["mix"] for h in eager.history] == [0.0, 0.5, 1.0, 1.0]
    assert [h["loss"] for h in compiled.history[:2]] == [h["loss"] for h in eager.history[:2]]  # eager until mix 1
    for c, e in zip(compiled.history[2:], eager.history[2:]):
        torch.testing.assert_close(c["loss"], e["loss"], rtol=1e-4, atol=1e-6)
    saved = torch.load(tmp_path / "c.pt", weights_only=False)["student"]
    assert saved.keys() == student.state_dict().keys() and not any(k.startswith("_orig_mod") for k in saved)


def test_compile_must_be_a_bool():
    with pytest.raises(bfx.ConfigError, match="compile='yes'"):
        DistillConfig(steps=1, compile="yes")
