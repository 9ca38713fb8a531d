"""bitlab_fx quickstart: a float MLP on scikit-learn's digits, made ternary with QAT, converted, inspected.

    python examples/quickstart.py

Trains an fp32 MLP, prepares a copy for ternary QAT (W1.58 absmean per-channel, A8 per-token; the
output layer kept at int8 by a mapping rule), fine-tunes it, converts it to packed 2-bit weights and
``torch.ops.bitlab`` calls, and prints the rewritten graph, the summary table, accuracies and sizes.
Runs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import io
import json
import time

import torch
from torch import nn
from tabulate import tabulate

import bitlab_fx as bfx


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


class MLP(nn.Module):
    def __init__(self, width: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.head(x)


def train(model, x, y, epochs: int, lr: float, label: str, batch: int = 64, seed: int = 0, history=None, test=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + batch - 1) // batch))
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if history is not None:  # test accuracy per epoch, for the curves of docs/make_plots.py
            history.append((epoch + 1, accuracy(model.eval(), *test)))
            model.train()
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(f"  [{label}] epoch {epoch + 1:2d}/{epochs}  loss {total / len(x):.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item() * 100


def state_dict_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--qat-epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--json", default=None, help="write accuracies, per-epoch curves and sizes to this JSON file")
    args = ap.parse_args(argv)
    curves = {"fp32": [], "ternary QAT": []}
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_split()

    print(f"digits: {len(xtr)} train / {len(xte)} test samples, 64 features, 10 classes")
    print("1) fp32 training")
    fp32 = train(MLP(args.width), xtr, ytr, args.epochs, 2e-3, "fp32", history=curves["fp32"], test=(xte, yte))

    print("2) ternary QAT, starting from the fp32 weights")
    qconfig = (bfx.QConfigMapping()
               .set_global(bfx.ternary())                  # W1.58 absmean per-channel + A8 per-token
               .set_module_name("head", bfx.int8()))       # the 10-way classifier keeps int8 weights
    prepared = bfx.prepare_qat(fp32, qconfig, example_inputs=(xtr[:2],))
    prepared = train(prepared, xtr, ytr, args.qat_epochs, 1e-3, "ternary QAT", history=curves["ternary QAT"],
                     test=(xte, yte))

    print("3) convert to packed weights + torch.ops.bitlab ops")
    converted = bfx.convert(prepared.eval())
    print("\nThe converted graph:")
    converted.print_readable()
    print(bfx.summary(converted))

    x1 = xte[:1]
    for m in (fp32, converted):  # warm up (the CPU kernel compiles on first use)
        m(x1)
    timings = {}
    for name, m in (("fp32", fp32), ("converted", converted)):
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(200):
                m(x1)
        timings[name] = (time.perf_counter() - t0) / 200 * 1e6

    acc = {"fp32": accuracy(fp32, xte, yte), "ternary QAT (fake quant)": accuracy(prepared, xte, yte),
           "converted": accuracy(converted, xte, yte)}
    size_fp32, size_conv = state_dict_bytes(fp32), state_dict_bytes(converted)
    print("\nResults (test set):")
    print(tabulate([
        ["fp32", f"{acc['fp32']:.2f}", f"{size_fp32:,}", "1.0x", f"{timings['fp32']:.0f}"],
        ["ternary QAT (fake quant)", f"{acc['ternary QAT (fake quant)']:.2f}", "", "", ""],
        ["converted (packed 2-bit)", f"{acc['converted']:.2f}", f"{size_conv:,}", f"{size_fp32 / size_conv:.1f}x smaller",
         f"{timings['converted']:.0f}"],
    ], headers=["model", "accuracy %", "state_dict bytes", "size", "batch-1 latency (us)"]))
    print("(latency of a tiny model is dominated by Python/dispatch overhead; see benchmarks/ for kernel speed)")
    print(f"converted vs fp32: {acc['converted'] - acc['fp32']:+.2f} points")
    if args.json:
        record = {"example": "quickstart", "args": vars(args), "accuracy": acc, "curves": curves,
                  "sizes": {"fp32": size_fp32, "converted": size_conv}, "date": time.strftime("%Y-%m-%d")}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    return acc


if __name__ == "__main__":
    main()
