"""Pass 1, normalize: every supported layer call in one functional form with its LayerMeta; the rest recorded."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from bitlab_fx.passes._common import META, RECORD_KEY, layer_nodes
from bitlab_fx.passes.normalize import module_kind, normalize, resolve_padding


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.c1 = nn.Conv1d(2, 2, 3, padding="same")
        self.c2 = nn.Conv2d(2, 2, 3, stride=2)
        self.c3 = nn.Conv3d(1, 1, 1)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x, img, vol):
        h = F.linear(self.fc(x), self.w)
        return h, self.c1(img.flatten(2)), self.c2(img), self.c3(vol)


def test_module_and_functional_layers_become_functional_calls_with_their_records():
    gm = normalize(fx.symbolic_trace(Mixed()))
    metas = {n.meta[META].fqn: (n.target, n.meta[META]) for n in layer_nodes(gm)}
    assert set(metas) == {"fc", "c1", "c2", "w"}
    assert metas["fc"][0] is F.linear and metas["fc"][1].weight == "fc.weight" and metas["fc"][1].bias == "fc.bias"
    assert metas["w"][0] is F.linear and metas["w"][1].object_type is F.linear and metas["w"][1].bias is None
    assert metas["c1"][0] is F.conv1d and metas["c2"][0] is F.conv2d
    c2 = next(n for n in layer_nodes(gm) if n.meta[META].fqn == "c2")
    assert list(c2.args[3:7]) == [(2, 2), (0, 0), (1, 1), 1]  # stride, padding, dilation, groups: explicit
    c1 = next(n for n in layer_nodes(gm) if n.meta[META].fqn == "c1")
    assert c1.args[4] == (1,)  # padding="same" resolved
    assert "c3" in gm.meta[RECORD_KEY].skipped and "not supported" in gm.meta[RECORD_KEY].skipped["c3"]


def test_normalized_graph_computes_what_the_model_computes():
    torch.manual_seed(0)
    model = Mixed()
    args = (torch.randn(3, 8), torch.randn(3, 2, 4, 4), torch.randn(1, 1, 2, 2, 2))
    gm = normalize(fx.symbolic_trace(model))
    for got, want in zip(gm(*args), model(*args)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("padding, kernel, dilation, want", [("valid", (3, 3), 1, (0, 0)), ("same", (3, 5), 1, (1, 2)),
                                                             ("same", (4,), 1, None), ("same", (3,), 2, (2,)),
                                                             (1, (3, 3), 1, (1, 1))])
def test_resolve_padding(padding, kernel, dilation, want):
    assert resolve_padding(padding, kernel, dilation) == want


def test_module_kind_keeps_subclasses_that_keep_forward():
    class MyLinear(nn.Linear):
        pass

    class Custom(nn.Linear):
        def forward(self, x):
            return x @ self.weight.t()

    assert module_kind(MyLinear(2, 2)) == "linear" and module_kind(nn.Conv1d(1, 1, 1)) == "conv1d"
    assert module_kind(Custom(2, 2)) is None and module_kind(nn.ReLU()) is None
