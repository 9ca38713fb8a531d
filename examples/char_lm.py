"""A small Llama-style byte-level language model on Python's own standard library source, fp32 vs ternary.

    python examples/char_lm.py            # about 10 minutes on 2 CPU cores (3 trainings of 300 steps)
    python examples/char_lm.py --steps 60 # a quick smoke run

Trains the same model three ways with the same budget: fp32, ternary QAT from scratch, and ternary
QAT with a warm-up (`bfx.QuantWarmup`: float for the first steps, then a linear ramp to fully
quantized). Prints validation perplexity, then converts the ternary model, generates text and compares
tokens/s with fp32. The corpus (the .py files of the running Python's standard library) is read at
run time: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import pathlib
import sysconfig
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import bitlab_fx as bfx


# ---------------------------------------------------------------------------------------------- data
def load_corpus(max_bytes: int) -> torch.Tensor:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    chunks, total = [], 0
    for p in files:
        data = p.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    data = b"\n".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(data: torch.Tensor, ctx: int, batch: int, g: torch.Generator):
    while True:
        idx = torch.randint(0, len(data) - ctx - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + ctx] for i in idx])
        y = torch.stack([data[i + 1:i + ctx + 1] for i in idx])
        yield x, y


# --------------------------------------------------------------------------------------------- model
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.size(0), x.size(1), x.size(2)
        shape = (b, t, self.heads, d // self.heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.input_norm = RMSNorm(d)
        self.self_attn = Attention(d, heads)
        self.post_attn_norm = RMSNorm(d)
        self.mlp = MLP(d, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_norm(x))
        return x + self.mlp(self.post_attn_norm(x))


class TinyLlama(nn.Module):
    """Embedding, pre-norm blocks (attention + SwiGLU MLP), final norm, untied LM head."""

    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 4, heads: int = 4, ctx: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.layers = nn.ModuleList(Block(d, heads, 4 * d) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx):
        x = self.embed(idx) + self.pos[: idx.size(1)]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# ------------------------------------------------------------------------------------------ training
def train(model, data, args, label, warmup=None, val_data=None, curve=None):
    """AdamW + one-cycle schedule; every ``args.eval_every`` steps appends (step, val perplexity) to ``curve``."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    it = batches(data, args.ctx, args.batch, g)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = next(it)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if warmup is not None:
            warmup.step()
        if curve is not None and val_data is not None and (step % args.eval_every == 0 or step == args.steps):
            curve.append((step, perplexity(model.eval(), val_data, args, n_batches=2)))
            model.train()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            mix = f"  mix {warmup.mix:.2f}" if warmup is not None else ""
            print(f"  [{label}] step {step:4d}/{args.steps}  loss {loss.item():.3f}{mix}  ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    return model.eval()


@torch.no_grad()
def perplexity(model, data, args, n_batches: int = 8) -> float:
    g = torch.Generator().manual_seed(1234)
    it = batches(data, args.ctx, args.batch, g)
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in (next(it) for _ in range(n_batches))]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def generate(model, prompt: bytes, n: int, ctx: int):
    idx = torch.tensor([list(prompt)], dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model(idx[:, -ctx:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    dt = time.perf_counter() - t0
    return bytes(idx[0].tolist()).decode("utf-8", "replace"), n / dt


def state_dict_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def ternary_mapping(weight_scale: str = "absmean") -> bfx.QConfigMapping:
    """Every linear ternary (W1.58 + A8 per token); the LM head stays float (embeddings are not layers)."""
    return bfx.QConfigMapping().set_global(bfx.ternary(weight_scale=weight_scale)).set_module_name("lm_head", None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--corpus-bytes", type=int, default=3_000_000)
    ap.add_argument("--warmup-frac", type=float, default=0.25, help="share of steps for the float->ternary ramp")
    ap.add_argument("--weight-scale", default="absmean", choices=["absmean", "absmax", "learned"],
                    help="ternary weight scale of the QAT runs")
    ap.add_argument("--eval-every", type=int, default=30, help="steps between validation points of the curves")
    ap.add_argument("--json", default=None, help="write perplexities, curves and sizes to this JSON file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_corpus(args.corpus_bytes)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"corpus: {len(data):,} bytes of Python standard library source ({len(train_data):,} train)")

    def fresh():
        torch.manual_seed(0)
        return TinyLlama(d=args.dim, layers=args.layers, ctx=args.ctx)

    qconfig = ternary_mapping(args.weight_scale)
    results, curves, t_start = {}, {}, time.perf_counter()
    print("1) fp32")
    curves["fp32"] = []
    fp32 = train(fresh(), train_data, args, "fp32", val_data=val_data, curve=curves["fp32"])
    results["fp32"] = perplexity(fp32, val_data, args)
    print(f"2) ternary QAT from scratch (weight scale {args.weight_scale})")
    curves["ternary QAT"] = []
    tern = train(bfx.prepare_qat(fresh(), qconfig), train_data, args, "ternary", val_data=val_data,
                 curve=curves["ternary QAT"])
    results["ternary QAT"] = perplexity(tern, val_data, args)
    print("3) ternary QAT with warm-up (bfx.QuantWarmup: linear float->ternary ramp)")
    tern_w = bfx.prepare_qat(fresh(), qconfig)
    warm = bfx.QuantWarmup(tern_w, ramp_steps=int(args.warmup_frac * args.steps))
    curves["ternary QAT + warm-up"] = []
    tern_w = train(tern_w, train_data, args, "ternary+warmup", warmup=warm, val_data=val_data,
                   curve=curves["ternary QAT + warm-up"])
    results["ternary QAT + warm-up"] = perplexity(tern_w, val_data, args)

    best_name = min(("ternary QAT", "ternary QAT + warm-up"), key=results.get)
    best = tern if best_name == "ternary QAT" else tern_w
    converted = bfx.convert(best.eval())
    results["converted (" + best_name + ")"] = perplexity(converted, val_data, args)
    print(bfx.summary(converted))

    rows = [[k, f"{v:.3f}", f"{v / results['fp32']:.3f}x"] for k, v in results.items()]
    print(f"\nValidation perplexity (bytes), same training budget ({args.steps} steps x {args.batch} x {args.ctx} "
          f"tokens, d={args.dim}, {args.layers} layers, lr {args.lr}, weight scale {args.weight_scale}):")
    print(tabulate(rows, headers=["model", "perplexity", "vs fp32"]))

    prompt = b"def "
    generate(fp32, prompt, 4, args.ctx), generate(converted, prompt, 4, args.ctx)  # warm up kernels
    text_f, tps_f = generate(fp32, prompt, 64, args.ctx)
    text_c, tps_c = generate(converted, prompt, 64, args.ctx)
    sizes = {"fp32": state_dict_bytes(fp32), "converted": state_dict_bytes(converted)}
    print("\nGreedy samples:")
    print(f"  fp32     : {text_f!r}")
    print(f"  converted: {text_c!r}")
    print(tabulate([["fp32", f"{tps_f:.1f}", "1.00x", f"{sizes['fp32']:,}"],
                    ["converted", f"{tps_c:.1f}", f"{tps_c / tps_f:.2f}x", f"{sizes['converted']:,}"]],
                   headers=["generate (no KV cache)", "tokens/s", "speed", "state_dict bytes"]))
    print(f"total time {time.perf_counter() - t_start:.0f}s")
    if args.json:
        record = {"example": "char_lm", "args": vars(args), "perplexity": results, "curves": curves, "sizes": sizes,
                  "tokens_per_s": {"fp32": tps_f, "converted": tps_c}, "date": time.strftime("%Y-%m-%d")}
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
