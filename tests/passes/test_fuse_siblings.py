"""Sibling fusion at convert: layers that read the same input run as one op call, with unchanged outputs."""
import copy
import os
import pickle

import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.nn.fused import FusedLinears

_hf_tiny = pytest.importorskip("_hf_tiny")
build = _hf_tiny.build


class QKV(nn.Module):
    """Traces whole: three projections of one input, a fourth of another."""

    def __init__(self, bias=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32, bias=bias), nn.Linear(32, 16, bias=bias), nn.Linear(32, 16)
        self.o = nn.Linear(64, 32)

    def forward(self, x):
        return self.o(torch.cat([self.q(x), self.k(x) * self.v(x), self.v(x) + 1], -1))


def _ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", None) == "bitlab"]


def _converted(model, qc=None, fuse=True):
    torch.manual_seed(0)
    pm = bfx.prepare_qat(model, qc or bfx.ternary()).eval()
    return bfx.convert(pm, fuse_siblings=fuse)


@pytest.mark.parametrize("bias", [False, True])
def test_siblings_become_one_call_with_the_same_outputs_names_and_state(bias):
    torch.manual_seed(1)
    model = QKV(bias)
    fused, plain = _converted(model), _converted(model, fuse=False)
    # q/k/v in one call; v's second call (a shared weight) and o stay calls of their own
    assert len(_ops(fused)) == 3 and len(_ops(plain)) == 5
    x = torch.randn(3, 5, 32)
    assert torch.equal(fused(x), plain(x))
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [r["layer"] for r in bfx.summary(fused).rows] == ["q", "k", "v", "o"]
    assert bfx.summary(fused).totals == bfx.summary(plain).totals
    group = next(m for m in fused.modules() if isinstance(m, FusedLinears))
    assert group.names == ["q", "k", "v"] and fused.q.packed_weight.data_ptr() == group.packed_weight.data_ptr()


class Flat(nn.Module):
    """Model code that merges dims of a projection's output with view (needs a contiguous output)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x):
        return self.a(x).view(-1, 16) + self.b(x).view(-1, 16)


def test_fused_outputs_are_contiguous_like_the_members_own():
    torch.manual_seed(1)
    model = Flat()
    fused, plain = _converted(model), _converted(model, fuse=False)
    assert len(_ops(fused)) == 1
    x = torch.randn(3, 5, 32)
    assert torch.equal(fused(x), plain(x))


def test_load_state_dict_writes_through_to_the_fused_rows():
    torch.manual_seed(1)
    a = _converted(QKV())
    b = _converted(QKV(), fuse=False)  # other random weights
    a.load_state_dict(b.state_dict())
    x = torch.randn(2, 32)
    assert torch.equal(a(x), b(x))


def test_copies_and_dtype_moves_keep_the_members_on_the_fused_rows():
    torch.manual_seed(1)
    model = QKV(bias=True)
    fused, plain = _converted(model), _converted(model, fuse=False)
    twin = copy.deepcopy(fused)
    x = torch.randn(4, 32)
    next(m for m in fused.modules() if isinstance(m, FusedLinears)).rows_call(x, 0, 2)  # prepared calls: not pickled
    assert torch.equal(twin(x), plain(x)) and torch.equal(pickle.loads(pickle.dumps(fused))(x), plain(x))
    group = next(m for m in twin.modules() if isinstance(m, FusedLinears))
    assert twin.k.packed_weight.untyped_storage().data_ptr() == group.packed_weight.untyped_storage().data_ptr()
    half = fused.to(torch.bfloat16)
    assert half.q.bias.dtype == torch.bfloat16 and half.q.weight_scale.dtype == torch.float32
    assert half.q.bias.data_ptr() == next(m for m in half.modules() if isinstance(m, FusedLinears)).bias.data_ptr()
    assert torch.equal(half(x.bfloat16()), plain.to(torch.bfloat16)(x.bfloat16()))


def test_save_and_load_quantized_of_a_fused_model(tmp_path):
    torch.manual_seed(1)
    fused = _converted(QKV(bias=True))
    path = os.path.join(tmp_path, "qkv.safetensors")
    bfx.save_quantized(fused, path)
    loaded = bfx.load_quantized(QKV(bias=True), path)
    x = torch.randn(2, 32)
    assert torch.equal(loaded(x), fused(x))


def test_layers_that_cannot_share_a_call_stay_separate():
    torch.manual_seed(1)
    qc = (bfx.QConfigMapping().set_global(bfx.ternary())
          .set_module_name("k", bfx.weight_only(bfx.TernaryWeight()))  # another activation mode
          .set_module_name("v", bfx.QuantConfig(weight=bfx.TernaryWeight(granularity="per_tensor"), input="int8")))
    cm = _converted(QKV(), qc)
    assert len(_ops(cm)) == 5 and not any(isinstance(m, FusedLinears) for m in cm.modules())


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2"])
def test_hf_decoders_fused_equal_unfused_and_generate_the_same(name):
    model, (ids,), _, head = build(name)
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name(head, bfx.int8())
    pm = bfx.prepare_qat(model.eval(), qc).eval()
    fused, plain = bfx.convert(pm), bfx.convert(pm, fuse_siblings=False)
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, plain(ids).logits)
    with torch.inference_mode():
        assert torch.equal(fused(ids).logits, plain(ids).logits)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(ids[:1], **kw), plain.generate(ids[:1], **kw))
    assert list(fused.state_dict()) == list(plain.state_dict())
    if name != "gpt2":  # (GPT-2's attention has one c_attn layer: nothing to fuse there; its MLP is c_fc, c_proj)
        with torch.profiler.profile() as prof, torch.no_grad():
            fused(ids[:1, :1])
        calls = sum(e.count for e in prof.key_averages() if e.key.startswith("bitlab::"))
        assert calls == 2 * 4 + 1  # per layer: qkv, o, gate+up, down; then the head


def test_compiled_decode_of_a_fused_model_matches():
    model, (ids,), _, head = build("llama")
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name(head, bfx.int8())
    pm = bfx.prepare_qat(model.eval(), qc).eval()
    plain = bfx.convert(pm, fuse_siblings=False)
    compiled = bfx.compile_for_decode(bfx.convert(pm))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(compiled.generate(ids[:1], **kw), plain.generate(ids[:1], **kw))
