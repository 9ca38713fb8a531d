"""Mixture-of-experts language models on tiny random configs (issue 22): Mixtral and Qwen3-MoE keep their experts as
3-D weights; they are quantized per expert, train, convert to the grouped op, agree, generate, and the summary's
quantized share is what runs quantized. The older layout (an nn.ModuleList of nn.Linear experts) goes through the
ordinary linear path."""
import pickle

import pytest
import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.nn.experts import QuantizedExperts, QuantizedGroupedLinear
from bitlab_fx.nn.quantized import QuantizedLinear
from _hf_tiny import VOCAB, transformers as T

IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def _moe(name):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2)
    if name == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**common, intermediate_size=64, num_local_experts=4))
    return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                                  num_experts=4, head_dim=8))


def _running_quantized(model):
    """Parameters that run quantized in a converted model, counted from its packed modules."""
    layers = sum(m.weight_shape[0] * m.weight_shape[1] + (0 if m.bias is None else m.bias.numel())
                 for m in model.modules() if isinstance(m, QuantizedLinear))
    experts = sum(m.weight_shape[0] * m.weight_shape[1] * m.weight_shape[2] for m in model.modules()
                  if isinstance(m, QuantizedGroupedLinear))
    return layers + experts


@pytest.mark.parametrize("name", ["mixtral", "qwen3moe"])
def test_moe_experts_train_convert_agree_and_generate(name):
    model = _moe(name)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n)
    pm = bfx.prepare_qat(model, bfx.ternary(), (IDS,))
    experts = pm.model.layers[0].mlp.experts
    before = experts.down_proj.detach().clone()
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    pm(IDS, labels=IDS).loss.backward()
    assert experts.gate_up_proj.grad.abs().sum() > 0 and experts.down_proj.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(experts.down_proj.detach(), before)  # the 3-D float weights train
    cm = bfx.convert(pm.eval())
    assert isinstance(cm.model.layers[0].mlp.experts, QuantizedExperts)
    assert not any("experts" in n for n, _ in cm.named_parameters())  # no float expert weight left
    h = torch.randn(1, 7, 32)
    with torch.no_grad():
        assert torch.equal(cm.model.layers[0].mlp(h), pm.model.layers[0].mlp(h))  # the MoE block, bit for bit
        a, b = pm(IDS).logits, cm(IDS).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(cm))(IDS).logits, b)  # a converted model pickles
    prompt = IDS[:1, :4]
    assert torch.equal(cm.generate(prompt, max_new_tokens=3, do_sample=False),
                       pm.generate(prompt, max_new_tokens=3, do_sample=False))
    s = bfx.summary(cm)
    assert s.totals["quantized_share"] == pytest.approx(_running_quantized(cm) / matmul_params)
    assert s.totals["quantized_share"] > 0.95  # only the router stays float
    assert set(s.float_weights) == {"model.layers.0.mlp.gate.weight"}
    assert "quantized share of the matmul-shaped weights, by parameters: 9" in str(s)


def test_moe_experts_by_rule_int4_and_float():
    model = _moe("mixtral")
    qc = (bfx.QConfigMapping().set_global(bfx.ternary())
          .set_module_name_regex(r".*experts\.down_proj", bfx.weight_only(bfx.IntWeight(4, granularity="per_group:32")))
          .set_module_name("model.layers.0.mlp.experts.gate_up_proj", None))
    cm = bfx.convert(bfx.prepare_qat(model, qc, (IDS,)).eval())
    rows = {r["layer"]: r for r in bfx.summary(cm).rows}
    down, gate_up = rows["model.layers.0.mlp.experts.down_proj"], rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert (down["weight"], down["w_granularity"], down["activation"]) == ("int4", "per_group:32 per expert", "none")
    assert gate_up["weight"] == "float" and gate_up["rule"] == "module_name('model.layers.0.mlp.experts.gate_up_proj')"
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n)
    assert bfx.summary(cm).totals["quantized_share"] == pytest.approx(_running_quantized(cm) / matmul_params)


class _ExpertMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _ListMoE(nn.Module):
    """The older layout: experts in an nn.ModuleList, routed with data-dependent loops (fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(16, 4)
        self.experts = nn.ModuleList(_ExpertMLP() for _ in range(4))

    def forward(self, x):
        top_w, top_i = torch.softmax(self.router(x), -1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(top_i == e)
            if rows.numel():
                out = out.index_add(0, rows, expert(x[rows]) * top_w[rows, slot, None])
        return out


def test_module_list_experts_go_through_the_linear_path():
    x = torch.randn(9, 16)
    pm = bfx.prepare_qat(_ListMoE(), bfx.ternary(), (x,))
    s = bfx.summary(pm)
    assert s.totals["quantized"] == 9 and s.totals["quantized_share"] == 1.0  # router + 4 experts x 2 linears
    assert {k for k, v in s.traced.items() if v == "graph"} == {f"experts.{i}" for i in range(4)}
    pm(x).square().sum().backward()
    assert pm.experts[0].up.weight.grad is not None
    cm = bfx.convert(pm.eval())
    with torch.no_grad():
        assert torch.equal(cm(x), pm(x))
