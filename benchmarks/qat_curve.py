"""Training curves of the digits MLP (examples/quickstart.py): ternary QAT with the fake-quant layers against the
integer training forward (``QuantConfig(train_kernel="int8")``), same start, same batches, same optimizer.

    python benchmarks/qat_curve.py [--steps 200] [--every 20]

Both start from the same fp32 model (trained for 5 epochs first) and take the same AdamW steps on the same
minibatches (batch 64). Prints a markdown table of the training loss (mean over the last ``every`` steps), the
test accuracy at each checkpoint and the largest weight difference between the two runs.
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
            for name, kernel in (("fake quant", "fake_quant"), ("int8 forward", "int8"))}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in runs.items()}
    g = torch.Generator().manual_seed(1)
    losses = {name: [] for name in runs}
    print("| step | loss, fake quant | loss, int8 forward | test acc % fake quant | test acc % int8 forward | "
          "max weight diff |")
    print("|---|---|---|---|---|---|")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(xtr), (64,), generator=g)
        for name, model in runs.items():
            loss = F.cross_entropy(model.train()(xtr[idx]), ytr[idx])
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            losses[name].append(loss.item())
        if step % args.every == 0:
            a, b = runs["fake quant"], runs["int8 forward"]
            diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
            window = {n: sum(v[-args.every:]) / args.every for n, v in losses.items()}
            print(f"| {step} | {window['fake quant']:.4f} | {window['int8 forward']:.4f} | "
                  f"{accuracy(a.eval(), xte, yte):.1f} | {accuracy(b.eval(), xte, yte):.1f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
