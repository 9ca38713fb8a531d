"""Training curves of the digits MLP (examples/quickstart.py): ternary QAT with the fake-quant layers against the
integer training forward (``QuantConfig(train_kernel="int8")``), eager and compiled (``bfx.compile``, fullgraph),
same start, same batches, same optimizer.

    python benchmarks/qat_curve.py [--steps 200] [--every 20]

Both start from the same fp32 model (trained for 5 epochs first) and take the same AdamW steps on the same
minibatches (batch 64). Prints a markdown table of the training loss (mean over the last ``every`` steps), the
test accuracy at each checkpoint and the largest weight difference of each integer-forward run from the fake-quant
run (the compiled run's float ops round differently: its curve should overlap, not match bit for bit).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

import bitlab_fx as bfx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from quickstart import MLP, accuracy, load_digits_split, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_split()
    fp32 = train(MLP(), xtr, ytr, epochs=5, lr=2e-3, label="fp32")
    qconfig = bfx.ternary()
    runs = {name: bfx.prepare_qat(copy.deepcopy(fp32), dataclasses.replace(qconfig, train_kernel=kernel))
            for name, kernel in (("fake quant", "fake_quant"), ("int8 forward", "int8"), ("compiled", "int8"))}
    steps = {name: m for name, m in runs.items()}
    steps["compiled"] = bfx.compile(runs["compiled"], fullgraph=True)  # trains compiled; evaluated eagerly
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in runs.items()}
    g = torch.Generator().manual_seed(1)
    losses = {name: [] for name in runs}
    print("| step | loss: fake quant / int8 forward / int8 compiled | test acc %: same order | "
          "max weight diff from fake quant: int8 forward / compiled |")
    print("|---|---|---|---|")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(xtr), (64,), generator=g)
        for name, model in steps.items():
            loss = F.cross_entropy(model.train()(xtr[idx]), ytr[idx])
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            losses[name].append(loss.item())
        if step % args.every == 0:
            diff = {name: max((p - q).abs().max().item() for p, q in zip(runs["fake quant"].parameters(),
                                                                          runs[name].parameters()))
                    for name in ("int8 forward", "compiled")}
            window = " / ".join(f"{sum(v[-args.every:]) / args.every:.4f}" for v in losses.values())
            acc = " / ".join(f"{accuracy(m.eval(), xte, yte):.1f}" for m in runs.values())
            print(f"| {step} | {window} | {acc} | {diff['int8 forward']:.2e} / {diff['compiled']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
