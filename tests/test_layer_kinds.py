"""The table of layer kinds: every form of a kind leads back to it, and its parts fit together."""
import pytest
import torch
import torch.nn.functional as F

import bitlab_fx as bfx
from bitlab_fx.layer_kinds import BY_ATEN, BY_FUNCTIONAL, BY_MODULE, LAYER_KINDS, supported_names
from bitlab_fx.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant


def test_every_form_maps_back_to_its_kind():
    for kind in LAYER_KINDS.values():
        assert BY_MODULE[kind.module] is kind and BY_FUNCTIONAL[kind.functional] is kind
        assert all(BY_ATEN[a] is kind for a in kind.aten)
    assert supported_names() == "nn.Linear, nn.Conv1d, nn.Conv2d"


@pytest.mark.parametrize("name", list(LAYER_KINDS))
def test_exact_call_takes_the_functional_arguments(name):
    """With a quantizer disabled the exact call is the plain functional call on the same arguments."""
    kind = LAYER_KINDS[name]
    torch.manual_seed(0)
    shape = {"linear": ((2, 8), (4, 8)), "conv1d": ((2, 3, 9), (4, 3, 3)), "conv2d": ((2, 3, 6, 6), (4, 3, 3, 3))}
    x, w = (torch.randn(s) for s in shape[name])
    afq = ActivationFakeQuant(bfx.IntActivation(), token_dims=kind.token_dims)
    wfq = WeightFakeQuant(bfx.TernaryWeight())
    afq.enabled = False
    y = kind.exact(x, w, None, codes_from=x, weight=w, input_quantizer=afq, weight_quantizer=wfq)
    assert torch.equal(y, kind.functional(x, w))


def test_the_prepared_layer_call_is_the_kinds_exact_call(small_net):
    pm = bfx.prepare_qat(small_net, bfx.ternary())
    calls = {n.meta["bitlab"].op: n.target for n in pm.graph.nodes if "bitlab" in n.meta}
    assert calls == {"linear": LAYER_KINDS["linear"].exact, "conv2d": LAYER_KINDS["conv2d"].exact}
    assert F.linear not in calls.values()
