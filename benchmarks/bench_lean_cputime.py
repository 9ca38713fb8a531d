"""CPU time per decode token, one thread: SmolLM2 fp32 HF ``generate`` against the converted model (ternary + int8
head) through ``bfx.greedy_decode``'s lean engine.

    flock /tmp/bitlab_bench.lock python benchmarks/bench_lean_cputime.py

``time.process_time`` (the CPU time of all this process's threads) of generating 17 tokens minus 1 token, over 16,
5 interleaved rounds, medians and spread. Less sensitive to a crowded host than wall time (a descheduled thread
costs no CPU time), still sensitive to shared caches and memory bandwidth; one thread, so it says nothing of
how either side scales to two.
"""
import os
import statistics
import sys
import time

import torch

import bitlab_fx as bfx

sys.path.insert(0, os.path.dirname(__file__))
import bench_llm  # noqa: E402

torch.set_num_threads(1)
class A: model = "smollm2"
model, _ = bench_llm.load_model(A)
cm = bench_llm.convert(model, "ternary")
prompt = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
def fp32(n):
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
def lean(n):
    bfx.greedy_decode(cm, prompt, n, engine="lean")
def per_token(f, n=17):
    t0 = time.process_time(); f(1); t1 = time.process_time(); f(n); t2 = time.process_time()
    return ((t2 - t1) - (t1 - t0)) / (n - 1) * 1e3
for f in (fp32, lean): f(2)
res = {"fp32": [], "lean": []}
for r in range(5):
    for k, f in (("fp32", fp32), ("lean", lean)):
        res[k].append(per_token(f))
    print("round", r + 1, {k: round(v[-1], 2) for k, v in res.items()}, flush=True)
m = {k: statistics.median(v) for k, v in res.items()}
print({k: f"{m[k]:.2f} ms ({min(v):.2f}-{max(v):.2f})" for k, v in res.items()}, f"ratio {m['fp32'] / m['lean']:.2f}x")
