"""torch.export frontend end to end, and deployment of converted models: torch.compile fullgraph, .pt2 round trip."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bitlab_fx as bfx


class Net(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, width)
        self.drop = nn.Dropout(0.5)
        self.w = nn.Parameter(torch.randn(width, width) / 8)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        x = self.drop(torch.relu(self.fc(x)))
        return self.head(torch.relu(nn.functional.linear(x, self.w)))


def _qc():
    return (bfx.QConfigMapping().set_global(bfx.ternary()).set_object_type(nn.Conv2d, bfx.int8())
            .set_module_name("head", None))


def _ops(gm):
    return sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "bitlab" in str(n.target))


def test_export_frontend_trains_switches_mode_and_converts():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    pm = bfx.prepare_qat(Net(), _qc(), (x,), frontend="export")
    rows = {r["layer"]: r for r in bfx.summary(pm).rows}
    assert rows["conv"]["weight"] == "int8" and rows["fc"]["weight"] == "ternary" and rows["head"]["weight"] == "float"
    assert rows["w"]["type"] == "F.linear" and rows["conv"]["rule"] == "object_type(torch.nn.Conv2d)"
    pm.train()
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    w0 = pm.fc.weight.detach().clone()
    for _ in range(2):
        pm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(w0, pm.fc.weight)
    assert not torch.equal(pm(x), pm(x))  # dropout active in train mode
    pm.eval()
    assert torch.equal(pm(x), pm(x))  # ... and off in eval mode
    cm = bfx.convert(pm)
    assert _ops(cm) == ["bitlab.int8_conv2d.default", "bitlab.ternary_linear.default", "bitlab.ternary_linear.default"]
    with torch.no_grad():
        a, b = pm(x), cm(x)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4


def test_export_frontend_needs_example_inputs():
    with pytest.raises(bfx.CaptureError, match="example_inputs"):
        bfx.prepare_qat(Net(), _qc(), frontend="export")


def test_compile_fullgraph_has_no_graph_break_at_bitlab_ops():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    cm = bfx.convert(bfx.prepare_qat(Net(), _qc()).eval())
    torch._dynamo.reset()
    compiled = torch.compile(cm, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    with torch.no_grad():
        assert torch.allclose(compiled(x), cm(x), atol=1e-6)


def test_pt2_round_trip_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    x = torch.randn(3, 512)
    cm = bfx.convert(bfx.prepare_qat(model, bfx.ternary()).eval())
    path = str(tmp_path / "model.pt2")
    torch.export.save(torch.export.export(cm, (x,)), path)
    with torch.no_grad():
        expected = cm(x)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert fp32_bytes / os.path.getsize(path) >= 12  # packed 2-bit weights, no float copy
    script = textwrap.dedent(f"""
        import torch, bitlab_fx
        io = torch.load({str(tmp_path / 'io.pt')!r})
        m = torch.export.load({path!r}).module()
        assert torch.equal(m(io["x"]), io["y"]), "outputs differ"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_export_frontend_quantizes_hf_conv1d_and_switches_attention_dropout():
    """GPT-2's Conv1D exports as addmm(bias, x, weight[in, out]); its attention bakes dropout_p into sdpa."""
    pytest.importorskip("transformers")
    from _hf_tiny import build

    model, ex, _, head = build("gpt2")
    model.config.use_cache = False
    pm = bfx.prepare_qat(model, bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name(head, None), ex,
                         frontend="export")
    rows = [r for r in bfx.summary(pm).rows if r["type"] == "Conv1D"]
    assert len(rows) == 8 and all(r["weight"] == "ternary" for r in rows)
    assert rows[0]["layer"] == "transformer.h.0.attn.c_attn"

    def logits(m):
        with torch.no_grad():
            out = m(*ex)
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)

    pm.train()
    assert not torch.equal(logits(pm), logits(pm))  # attention (and residual) dropout on
    pm.eval()
    a = logits(pm)
    assert torch.equal(a, logits(pm))  # ... and off: the exported dropout_p=0.1 no longer applies
    cm = bfx.convert(pm)
    assert _ops(cm) == ["bitlab.ternary_linear.default"] * 8
    b = logits(cm)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
