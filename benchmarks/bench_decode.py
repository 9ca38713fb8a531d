"""Greedy decode at batch 1: a Llama-style model from a transformers config (random weights), fp32 vs converted.

    flock -x /tmp/bitlab_cpu.lock python benchmarks/bench_decode.py            # hidden 2048, 4 layers
    python benchmarks/bench_decode.py --layers 2 --new-tokens 16                 # quicker

Every nn.Linear of the decoder layers is ternary (W1.58, int8 per-token activations; ``--decoder int4`` /
``int4-wo`` for 4-bit weights with int8 or float activations); the embedding stays float and ``lm_head`` is
converted float and/or int8 (``--heads``), so they bound the speed-up. Prints one table, tokens/s side by side.
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers

import bitlab_fx as bfx


DECODERS = {
    "ternary": lambda: bfx.ternary(),
    "int4": lambda: bfx.QuantConfig(weight=bfx.IntWeight(4), input="int8"),
    "int4-wo": lambda: bfx.weight_only(bfx.IntWeight(4)),
}


def build(args) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                                   num_key_value_heads=args.hidden // 128, max_position_embeddings=4096)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens_per_s(model, prompt, new_tokens: int, repeats: int) -> tuple:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompt, **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up (kernel build, caches)
        best, out = float("inf"), None
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(prompt, **kw)
            best = min(best, time.perf_counter() - t)
    return new_tokens / best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--heads", default="float,int8", help="lm_head variants to convert: float, int8 (comma-separated)")
    p.add_argument("--decoder", default="ternary", choices=sorted(DECODERS),
                   help="the decoder layers' config: ternary (int8 activations), int4 (4-bit weights, int8 "
                        "activations), int4-wo (4-bit weights, float activations: bfx.weight_only)")
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(torch.get_num_threads())
    model = build(args)
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    fp32_tps, _ = tokens_per_s(model, prompt, args.new_tokens, args.repeats)
    print(f"Llama-style hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} vocab={args.vocab}, "
          f"batch 1, prompt {args.prompt}, {args.new_tokens} new tokens greedy, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows = [f"| fp32 | {linear_bytes / 2**20:.0f} MiB | {fp32_tps:.1f} | 1.00x |"]
    heads = {"float": None, "int8": bfx.int8()}
    for head in args.heads.split(","):
        qc = bfx.QConfigMapping().set_global(DECODERS[args.decoder]()).set_module_name("lm_head", heads[head])
        converted = bfx.convert(bfx.prepare_qat(model, qc).eval(), inplace=True)
        q_tps, _ = tokens_per_s(converted, prompt, args.new_tokens, args.repeats)
        s = bfx.summary(converted).totals
        rows.append(f"| {args.decoder} decoder, lm_head {head} | {s['bytes_quant'] / 2**20:.0f} MiB | "
                    f"{q_tps:.1f} | {q_tps / fp32_tps:.2f}x |")
        del converted
    print("| model | linear-layer bytes | tokens/s | speed-up |\n| --- | --- | ---: | ---: |")
    print("\n".join(rows))

if __name__ == "__main__":
    main()
