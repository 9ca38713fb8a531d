"""Partial tracing (capture/partial.py plans, partial.py prepares and converts): the largest traceable parts
become prepared graphs, supported layers under untraceable parents become lone-layer graphs, the model keeps
its class, and mapping rules see the original fully-qualified names."""
import pickle

import torch
from torch import fx, nn

import bitlab_fx as bfx
from bitlab_fx.capture.partial import plan_partial, record_calls


class Block(nn.Module):  # traces
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Gated(nn.Module):  # data-dependent control flow: does not trace
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.skip = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.block(x) if x.sum() > -1e9 else x
        return self.head(h + self.skip(x))


def test_plan_traces_the_largest_parts_and_keeps_the_rest_as_lone_layers():
    model = Gated().eval()
    x = torch.randn(3, 16)
    plan = plan_partial(model, record_calls(model, (x,), None))
    assert set(plan.graphs) == {"block"} and set(plan.layers) == {"skip", "head"}
    assert plan.untraced == {}  # no untraceable module below the root (the root's reason is recorded by prepare_partial)


def test_prepared_parts_keep_the_class_and_the_rules_see_full_names():
    torch.manual_seed(0)
    qc = (bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("block.fc2", bfx.int8())
          .set_module_name("head", None))
    pm = bfx.prepare_qat(Gated(), qc, (torch.randn(3, 16),))
    assert type(pm) is Gated and isinstance(pm.block, fx.GraphModule)
    rows = {r["layer"]: r for r in bfx.summary(pm).rows}
    assert rows["block.fc1"]["weight"] == "ternary" and rows["block.fc2"]["weight"] == "int8"
    assert rows["skip"]["weight"] == "ternary" and rows["head"]["weight"] == "float"
    assert bfx.summary(pm).traced == {"block": "graph", "skip": "layer"}


def test_converted_partial_model_equals_prepared_bitwise():
    torch.manual_seed(1)
    pm = bfx.prepare_qat(Gated(), bfx.ternary(), (torch.randn(3, 16),))
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    for _ in range(3):
        loss = pm(torch.randn(8, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = pm.eval()(x)
        cm = bfx.convert(pm)
        assert type(cm) is Gated and torch.equal(cm(x), want)
    assert bfx.summary(cm).stage == "converted"


class TfPadded(nn.Module):  # reads its conv's geometry, as MobileNetV2's TF padding and Whisper's encoder do
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        pad = self.conv.kernel_size[0] - self.conv.stride[0]
        h = self.conv(nn.functional.pad(x, (0, pad, 0, pad))) if x.sum() > -1e9 else x
        return self.fc(h.mean((2, 3)))


def test_lone_layers_keep_the_public_attributes_model_code_reads():
    x = torch.randn(2, 3, 8, 8)
    pm = bfx.prepare_qat(TfPadded(), bfx.ternary(), (x,))
    assert bfx.summary(pm).traced == {"conv": "layer", "fc": "layer"}
    assert (pm.conv.stride, pm.conv.kernel_size, pm.conv.padding, pm.fc.in_features) == ((2, 2), (3, 3), (0, 0), 4)
    cm = bfx.convert(pm.eval())  # (a copy)
    assert cm.conv.stride == (2, 2) and pickle.loads(pickle.dumps(cm)).conv.stride == (2, 2)
    with torch.no_grad():
        assert torch.allclose(cm(x), pm(x), atol=1e-5)
