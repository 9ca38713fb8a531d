"""Sibling fusion at M = 1: one decoder layer's q/k/v projections and gated MLP, fused against unfused.

    python benchmarks/bench_fusion.py                               # SmolLM2-sized layer (hidden 576)
    python benchmarks/bench_fusion.py --hidden 2048 --intermediate 5632
    BITLAB_FX_TORCH_KERNELS=0 python benchmarks/bench_fusion.py     # without the C++ dispatcher kernels

A Llama layer (random weights) converted ternary with ``bfx.convert(..., fuse_siblings=True/False)``. "qkv" times
the three projection calls as an HF attention module makes them (eager, through the converted layers), "mlp"
the traced gate/up/down graph; rounds interleave the two models, the table shows medians and min-max.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import bitlab_fx as bfx


def _models(hidden: int, intermediate: int):
    heads = max(1, hidden // 64)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3))
    torch.manual_seed(0)
    prepared = bfx.prepare_qat(transformers.LlamaForCausalLM(cfg).eval(), bfx.ternary()).eval()
    return {"fused": bfx.convert(prepared), "unfused": bfx.convert(prepared, fuse_siblings=False)}


def _time_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    models = _models(args.hidden, args.intermediate)
    x = torch.randn(1, 1, args.hidden)

    def qkv(m):
        attn = m.model.layers[0].self_attn
        return lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))

    parts = {"qkv": qkv, "mlp": lambda m: (lambda: m.model.layers[0].mlp(x))}
    times = {(k, p_): [] for k in models for p_ in parts}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up and learns the shared calls
            for k, m in models.items():
                for name, make in parts.items():
                    times[(k, name)].append(_time_us(make(m), args.calls))
    print(f"hidden {args.hidden}, intermediate {args.intermediate}, M = 1, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; torch {torch.__version__}")
    print("| part | fused us (spread) | unfused us (spread) | fused / unfused |")
    print("| --- | ---: | ---: | ---: |")
    for name in parts:
        f, u = (times[(k, name)][1:] for k in ("fused", "unfused"))
        print(f"| {name} | {statistics.median(f):.1f} ({min(f):.1f}-{max(f):.1f}) | {statistics.median(u):.1f} "
              f"({min(u):.1f}-{max(u):.1f}) | {statistics.median(f) / statistics.median(u):.2f}x |")


if __name__ == "__main__":
    main()
