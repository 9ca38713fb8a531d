"""CPU time per decode token, one thread: SmolLM2 fp32 HF ``generate`` against the converted model (ternary + int8
head) through ``bfx.greedy_decode``'s lean engine.

    flock /tmp/bitlab_bench.lock python benchmarks/bench_lean_cputime.py
    flock /tmp/bitlab_bench.lock python benchmarks/bench_lean_cputime.py --decoder int4    # W4A8: int4 g32 + int8 head

``time.process_time`` (the CPU time of all this process's threads) of generating 17 tokens minus 1 token, over 16,
5 interleaved rounds, medians and spread. Less sensitive to a crowded host than wall time (a descheduled thread
costs no CPU time), still sensitive to shared caches and memory bandwidth; one thread, so it says nothing of
how either side scales to two.
"""
import argparse
import os
import statistics
import sys
import time

import torch

import bitlab_fx as bfx

sys.path.insert(0, os.path.dirname(__file__))
import bench_llm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoder", default="ternary", choices=sorted(bench_llm.DECODERS),
                   help="the decoder linears' format (bench_llm.DECODERS; the lm_head is int8)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _ = bench_llm.load_model(type("Args", (), {"model": "smollm2"}))
    converted = bench_llm.convert(model, args.decoder)
    prompt = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))

    def fp32(n):
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def lean(n):
        bfx.greedy_decode(converted, prompt, n, engine="lean")

    def cpu_ms_per_token(decode, n=17):
        t0 = time.process_time()
        decode(1)
        t1 = time.process_time()
        decode(n)
        t2 = time.process_time()
        return ((t2 - t1) - (t1 - t0)) / (n - 1) * 1e3

    runs = {"fp32": fp32, "lean": lean}
    for decode in runs.values():
        decode(2)  # warm-up
    results = {name: [] for name in runs}
    for r in range(5):  # interleaved rounds
        for name, decode in runs.items():
            results[name].append(cpu_ms_per_token(decode))
        print("round", r + 1, {name: round(v[-1], 2) for name, v in results.items()}, flush=True)
    median = {name: statistics.median(v) for name, v in results.items()}
    for name, v in results.items():
        print(f"{name}: {median[name]:.2f} CPU ms per token ({min(v):.2f}-{max(v):.2f})")
    print(f"fp32 / lean ({args.decoder} decoder, int8 head): {median['fp32'] / median['lean']:.2f}x")


if __name__ == "__main__":
    main()
