"""Eager sibling calls: which members share a call is learned from the calls, outputs are always their own."""
import copy

import torch

import bitlab_fx as bfx
from bitlab_fx.nn.fused import FusedLinears
from bitlab_fx.nn.quantized import QuantizedLinear
from bitlab_fx.nn.sibling_calls import SiblingCalls


def _layers(n=4, k=48, out=(32, 16, 16, 48)):
    torch.manual_seed(0)
    return [QuantizedLinear(torch.randn(o, k), torch.randn(o), bfx.TernaryWeight(), name=f"l{i}")
            for i, o in zip(range(n), out)]


def _group():
    layers = _layers()
    expected = [copy.deepcopy(m) for m in layers]  # unfused copies (their own buffers)
    return SiblingCalls(FusedLinears(layers, ["q", "k", "v", "o"])), expected


def test_cross_attention_pattern_shares_only_the_members_called_on_one_tensor():
    calls, ref = _group()
    dec, enc, attn = torch.randn(2, 48), torch.randn(5, 48), torch.randn(2, 48)
    for _ in range(3):  # round 1 is watched, later rounds share k+v
        outs = [calls(0, dec), calls(1, enc), calls(2, enc), calls(3, attn)]
        for i, (x, y) in enumerate(zip([dec, enc, enc, attn], outs)):
            assert torch.equal(y, ref[i](x))
    assert calls.runs == {1: (1, 2), 2: (1, 2)}


def test_self_attention_pattern_and_a_changed_or_repeated_input():
    calls, ref = _group()
    h, attn = torch.randn(3, 48), torch.randn(3, 48)
    for _ in range(2):
        [calls(i, h) for i in range(3)], calls(3, attn)
    assert calls.runs[0] == (0, 2)
    assert torch.equal(calls(0, h), ref[0](h))
    h.add_(1.0)  # changed in place after q: k must see the new values
    assert torch.equal(calls(1, h), ref[1](h))
    assert torch.equal(calls(1, h), ref[1](h))  # twice on the same tensor: computed again
    assert torch.equal(calls(2, h), ref[2](h))


def test_shared_outputs_are_contiguous_for_several_tokens():
    calls, ref = _group()
    h = torch.randn(2, 7, 48)
    for _ in range(2):
        outs = [calls(i, h) for i in range(3)]
    assert all(o.is_contiguous() for o in outs) and torch.equal(outs[2].view(-1, 16), ref[2](h).view(-1, 16))


def test_copies_do_not_carry_outputs_in_flight():
    calls, ref = _group()
    h = torch.randn(1, 48)
    for _ in range(2):
        [calls(i, h) for i in range(4)]
    calls(0, h)  # k and v outputs kept for h
    twin = copy.deepcopy(calls)
    assert twin._kept is None and twin.runs == calls.runs
    assert torch.equal(twin(1, h), ref[1](h))
