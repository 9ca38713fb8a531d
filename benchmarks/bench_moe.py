"""Mixture-of-experts experts: one layer's routed experts, converted (one grouped op per projection) against the float
experts module of transformers, at decode (1 token) and prefill.

    flock /tmp/bitlab_bench.lock python benchmarks/bench_moe.py                    # Qwen3-MoE-like, 32 experts
    flock /tmp/bitlab_bench.lock python benchmarks/bench_moe.py --experts 64 --top-k 8 --tokens 1 128

A transformers ``Qwen3MoeExperts`` module (random weights, ``[E, 2I, H]`` / ``[E, H, I]``) runs as transformers runs it
(``eager``: a loop over the hit experts; ``grouped_mm``: tokens sorted by expert, ``torch._grouped_mm`` or its
per-expert fallback on CPU) and converted by bitlab_fx (``ternary``, ``int4`` weights with int8 activations;
``bitlab.<format>_grouped_linear``). The routing is random top-k (the same for every variant); rounds interleave the
variants, the table shows medians and min-max in ms per call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import bitlab_fx as bfx
from bitlab_fx.nn.experts import FakeQuantExperts, QuantizedExperts


def _experts(hidden: int, inter: int, experts: int, top_k: int, impl: str):
    cfg = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                      num_experts_per_tok=top_k)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    module = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module.eval()


def _variants(hidden: int, inter: int, experts: int, top_k: int):
    eager = _experts(hidden, inter, experts, top_k, "eager")
    grouped = _experts(hidden, inter, experts, top_k, "grouped_mm")
    grouped.load_state_dict(eager.state_dict())
    out = {"float eager": eager, "float grouped_mm": grouped}
    for name, cfg in (("ternary", bfx.ternary()), ("int4", bfx.QuantConfig(weight="int4", input="int8"))):
        names = ("gate_up_proj", "down_proj")
        prepared = FakeQuantExperts(eager, {p: cfg for p in names}, {p: '"global"' for p in names}, "experts")
        out[f"bitlab {name}"] = QuantizedExperts(prepared.eval())
    return out


def _routing(tokens: int, hidden: int, experts: int, top_k: int):
    g = torch.Generator().manual_seed(tokens)
    h = torch.randn(tokens, hidden, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return h, idx, torch.softmax(torch.randn(tokens, top_k, generator=g), -1)


def _time_ms(fn, seconds: float = 0.5) -> float:
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    variants = _variants(args.hidden, args.intermediate, args.experts, args.top_k)
    inputs = {t: _routing(t, args.hidden, args.experts, args.top_k) for t in args.tokens}
    times = {(v, t): [] for v in variants for t in args.tokens}
    with torch.no_grad():
        ref = {t: variants["float eager"](*inputs[t]) for t in args.tokens}
        for (v, t) in times:
            err = (variants[v](*inputs[t]) - ref[t]).norm() / ref[t].norm()
            print(f"{v:18s} tokens {t:4d}: relative error vs float {err:.3f}")
        for _ in range(args.rounds):
            for t in args.tokens:
                for v, m in variants.items():
                    times[(v, t)].append(_time_ms(lambda: m(*inputs[t])))
    print(f"\nhidden {args.hidden}, moe_intermediate {args.intermediate}, {args.experts} experts, top-{args.top_k}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (ms per call: median, min-max; x: eager float / this)")
    for t in args.tokens:
        base = statistics.median(times[("float eager", t)])
        for v in variants:
            ts = times[(v, t)]
            med = statistics.median(ts)
            print(f"| {t:4d} tokens | {v:18s} | {med:8.2f} | {min(ts):.2f}-{max(ts):.2f} | {base / med:5.2f}x |")


if __name__ == "__main__":
    main()
