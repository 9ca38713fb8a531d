"""Tiny mixture-of-experts pieces for the experts tests: transformers experts modules with random weights, and a small
routed model (a router nn.Linear + a transformers experts module) that torch.fx traces whole."""
import torch
from torch import nn

from _hf_tiny import transformers as T

HIDDEN, INTER, EXPERTS, TOP_K = 32, 48, 4, 2


def experts(kind: str = "mixtral", seed: int = 0) -> nn.Module:
    """A transformers experts module (3-D weights) with random weights: "mixtral" ([E, out, in], SwiGLU) or "gptoss"
    ([E, in, out] transposed, biases, its own clamped GLU)."""
    torch.manual_seed(seed)
    if kind == "mixtral":
        cfg = T.MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS,
                              num_experts_per_tok=TOP_K)
        module = T.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
    else:
        cfg = T.GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS,
                             num_experts_per_tok=TOP_K)
        module = T.models.gpt_oss.modeling_gpt_oss.GptOssExperts(cfg)
    cfg._experts_implementation = "eager"
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def routing(tokens: int, seed: int = 1):
    """``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` for ``tokens`` tokens."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, HIDDEN, generator=g)
    idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, TOP_K, generator=g), -1)
    return h, idx, w


class RoutedMoE(nn.Module):
    """A router (nn.Linear) choosing ``TOP_K`` of the experts for each token, then a head: traceable whole by fx."""

    def __init__(self, kind: str = "mixtral"):
        super().__init__()
        self.experts = experts(kind)
        torch.manual_seed(2)
        self.router = nn.Linear(HIDDEN, EXPERTS)
        self.head = nn.Linear(HIDDEN, 8)

    def forward(self, x):
        h = x.reshape(-1, HIDDEN)
        top_w, top_i = torch.topk(torch.softmax(self.router(h), -1), TOP_K, dim=-1)
        return self.head(self.experts(h, top_i, top_w)).reshape(x.shape[0], -1, 8)
