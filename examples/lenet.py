"""The low-precision LeNet-5 of the Brevitas tutorial, with plain torch.nn and ONE bitlab_fx mapping.

    python examples/lenet.py            # about 30 seconds on one CPU core

Brevitas swaps layers (QuantConv2d(weight_bit_width=3, bias_quant=Int8Bias), QuantReLU(bit_width=4),
QuantIdentity(bit_width=4) for the input). Here the model stays plain torch.nn and one QConfigMapping
says the same thing, rule for rule, written as the seed reads (issue 20): 3-bit weights and 8-bit biases
everywhere, a 4-bit input quantizer on conv1 only (the QuantIdentity), 4-bit unsigned ReLU outputs, every
activation quantizer with IntActivation's defaults (dynamic: a scale per token, computed from each input).
The layers after conv1 have no input quantizer: the quantized ReLU outputs reach them through max-pool and
flatten, and each IntBias takes its step from the quantizer that reaches its layer (input_step * weight_step).
With dynamic quantizers that step is one per token (a conv's token is a sample), as Brevitas does for a bias
whose input scale is only known at run time: the bias is quantized per token when the layer runs. Converted,
every conv/linear is integer arithmetic (the op's own 4/5-bit input codes x 3-bit weights + the per-token
int32 bias codes in an int32 accumulator) with the requantization to 4 bits (bitlab.quantize_dequantize after
each ReLU) explicit in the graph, which this script prints. Spelled static (dynamic=False,
granularity="per_tensor", Brevitas' own scales), the biases are stored as int32 codes instead.
Data: scikit-learn's digits (8x8 grey) resized to 32x32x3, the input size of LeNet-5.
Trains fp32, fine-tunes the W3A4 model with QAT from the fp32 weights, converts it (weights packed two
per byte, bitlab ops), and prints fp32 vs QAT vs converted accuracy and the saved file sizes. Last, for
comparison, post-training quantization without any training: W8A8 with static int8 input scales
calibrated in eval mode (bfx.calibrate) on a few training batches.
"""
from __future__ import annotations

import argparse
import io
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx


class LeNet(nn.Module):
    """LeNet-5 as in the Brevitas tutorial, in plain torch.nn."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 6, 5), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(6, 16, 5), nn.ReLU()
        self.fc1, self.relu3 = nn.Linear(16 * 5 * 5, 120, bias=True), nn.ReLU()
        self.fc2, self.relu4 = nn.Linear(120, 84, bias=True), nn.ReLU()
        self.fc3 = nn.Linear(84, 10, bias=False)

    def forward(self, x):
        out = self.relu1(self.conv1(x))
        out = F.max_pool2d(out, 2)
        out = self.relu2(self.conv2(out))
        out = F.max_pool2d(out, 2)
        out = out.reshape(out.shape[0], -1)
        out = self.relu3(self.fc1(out))
        out = self.relu4(self.fc2(out))
        return self.fc3(out)


def low_precision_mapping() -> bfx.QConfigMapping:
    """Brevitas' LowPrecisionLeNet in one mapping, as the seed writes it: W3 (per channel) and Int8Bias on every
    layer, a 4-bit input quantizer on conv1 (QuantIdentity), uint4 ReLUs (QuantReLU)."""
    w3 = bfx.IntWeight(bits=3)                                                                         # weight_bit_width=3
    return (bfx.QConfigMapping()
            .set_global(bfx.QuantConfig(weight=w3, bias=bfx.IntBias(bits=8)))                          # bias_quant=Int8Bias
            .set_module_name("conv1", bfx.QuantConfig(weight=w3, bias=bfx.IntBias(bits=8),
                                                      input=bfx.IntActivation(bits=4)))                 # QuantIdentity(4)
            .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(bits=4, signed=False))))  # QuantReLU(4)


def integer_graph(converted) -> str:
    """The converted forward as fx prints it, without the buffer reads (``x = self.fc1.packed_weight``) and the
    ``...= None`` clean-ups: one line per op."""
    lines = [line.split(";  ")[0] for line in converted.code.strip().splitlines()[1:]]
    return "\n".join(line for line in lines if line.strip() and not (" = self." in line and "(" not in line))


def load_digits_32x32(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    xtr, xte, ytr, yte = train_test_split(x, torch.tensor(y), test_size=0.25, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


def train(model, x, y, epochs: int, lr: float, label: str, batch: int = 64, seed: int = 0, history=None, test=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + batch - 1) // batch))
    for epoch in range(epochs):
        model.train()
        perm, total, t0 = torch.randperm(len(x), generator=g), 0.0, time.time()
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"  [{label}] epoch {epoch + 1:2d}/{epochs}  loss {total / len(x):.4f}  ({time.time() - t0:.1f}s)", flush=True)
        if history is not None:  # test accuracy per epoch, for the curves of docs/make_plots.py
            history.append((epoch + 1, accuracy(model.eval(), *test)))
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item() * 100


def saved_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20, help="fp32 epochs")
    p.add_argument("--qat-epochs", type=int, default=20, help="QAT epochs (from the fp32 weights)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny: one thread is fastest on a shared machine)")
    p.add_argument("--json", default=None, help="write accuracies, per-epoch curves and sizes to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    curves = {"fp32": [], "W3A4 QAT": []}
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_32x32()
    print(f"digits resized to 32x32x3: {len(xtr)} train / {len(xte)} test images")

    print("1) fp32 LeNet-5")
    fp32 = train(LeNet(), xtr, ytr, args.epochs, 2e-3, "fp32", history=curves["fp32"], test=(xte, yte))
    acc_fp32 = accuracy(fp32, xte, yte)

    print("2) W3A4 QAT (3-bit weights, 4-bit input and ReLU outputs, 8-bit biases), from the fp32 weights")
    prepared = bfx.prepare_qat(fp32, low_precision_mapping(), example_inputs=(xtr[:2],))
    qat = train(prepared, xtr, ytr, args.qat_epochs, 1e-3, "W3A4 QAT", seed=1, history=curves["W3A4 QAT"], test=(xte, yte))
    acc_qat = accuracy(qat, xte, yte)

    print("3) convert: weights packed two per byte, integer ops with per-token int32 bias codes, explicit requantization")
    converted = bfx.convert(qat)
    acc_conv = accuracy(converted, xte, yte)
    with torch.no_grad():
        a, b = qat(xte), converted(xte)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    print("  converted graph:\n" + integer_graph(converted))
    print(bfx.summary(converted))

    sizes = {"fp32": saved_bytes(fp32), "QAT (prepared)": saved_bytes(qat), "converted": saved_bytes(converted)}
    print(f"\n{'model':<16}{'test acc':>10}{'state_dict bytes':>20}")
    for (name, size), acc in zip(sizes.items(), (acc_fp32, acc_qat, acc_conv)):
        print(f"{name:<16}{acc:>9.2f}%{size:>20,}")
    print(f"converted vs QAT: bitwise equal {torch.equal(a, b)} (max relative difference {rel:.2e}), "
          f"same predictions: {torch.equal(a.argmax(1), b.argmax(1))}")
    print(f"W3A4 accuracy gap to fp32: {acc_fp32 - acc_qat:+.2f} points; converted file {sizes['fp32'] / sizes['converted']:.1f}x smaller")

    print("\n4) post-training quantization, no training: int8 weights, static int8 inputs calibrated in eval mode")
    ptq = bfx.prepare_qat(fp32, bfx.QuantConfig(weight=bfx.IntWeight(8), input=bfx.IntActivation(
        8, dynamic=False, granularity="per_tensor")), example_inputs=(xtr[:2],)).eval()
    with torch.no_grad(), bfx.calibrate(ptq):
        for i in range(0, 8 * 64, 64):
            ptq(xtr[i:i + 64])
    acc_ptq = accuracy(bfx.convert(ptq), xte, yte)
    print(f"  W8A8 PTQ (calibrated, converted): {acc_ptq:.2f}% (fp32 {acc_fp32:.2f}%)")
    result = {"fp32": acc_fp32, "qat": acc_qat, "converted": acc_conv, "sizes": sizes, "rel": rel, "ptq": acc_ptq,
              "bitwise": torch.equal(a, b)}
    if args.json:
        record = {"example": "lenet", "args": vars(args), "accuracy": {"fp32": acc_fp32, "W3A4 QAT": acc_qat,
                  "converted": acc_conv, "W8A8 PTQ": acc_ptq}, "curves": curves, "sizes": sizes, "date": time.strftime("%Y-%m-%d")}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
