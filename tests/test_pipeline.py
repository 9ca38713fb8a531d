"""The pipeline: capture (fx whole / partial, export) then the passes of passes/pipeline.py, in order."""
import pytest
import torch
from torch import fx, nn

import bitlab_fx as bfx
from bitlab_fx.passes._common import RECORD_KEY
from bitlab_fx.passes.pipeline import convert_graph, prepare_graph
from bitlab_fx.pipeline import capture_export, capture_fx


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if x.sum() > -1e9 else x


def test_prepare_then_convert_graph_move_the_record_through_its_stages():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8)))
    gm = prepare_graph(gm, bfx.QConfigMapping().set_global(bfx.ternary()), {"frontend": "fx", "prefix": "x"})
    assert gm.meta[RECORD_KEY].stage == "prepared" and gm.meta[RECORD_KEY].prefix == "x"
    assert convert_graph(gm.eval()).meta[RECORD_KEY].stage == "converted"


def test_fx_capture_falls_back_to_partial_only_when_asked():
    mapping = bfx.QConfigMapping().set_global(bfx.ternary())
    with pytest.raises(bfx.CaptureError):
        capture_fx(Gate(), mapping, (torch.randn(2, 8),), partial=False)
    pm = capture_fx(Gate(), mapping, (torch.randn(2, 8),), partial=True)
    assert type(pm) is Gate and bfx.summary(pm).traced == {"fc": "layer"}


def test_export_capture_is_prepared_with_the_export_record():
    gm = capture_export(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), bfx.QConfigMapping().set_global(bfx.int8()),
                        (torch.randn(2, 8),), None)
    assert gm.meta[RECORD_KEY].frontend == "export" and gm.meta[RECORD_KEY].stage == "prepared"
    assert bfx.summary(gm).totals["quantized"] == 1
