"""QAT training step time and memory: fp32, bf16 autocast, bitlab_fx prepared models and peer QAT libraries.

    python benchmarks/bench_qat_step.py [--rounds 5] [--steps 5] [--cases mlp,llama] [--variants ...] [--memory]

Cases: an MLP of three 1024-wide layers (batch 256), a tiny Llama (hidden 512, 4 layers, seq 256, batch 4;
``transformers`` built from a config, random weights) and a small convnet (``--cases convnet``). Variants:

- ``fp32``; ``bf16 autocast`` (the fp32 model under ``torch.autocast("cpu", torch.bfloat16)``);
- ``bitlab ternary`` (``prepare_qat(model, bfx.ternary())``, eager fake quant), ``bitlab ternary int8-fwd``
  (``train_kernel="int8"``: the integer forward, int8 codes saved for the backward), and both under
  ``torch.compile`` (``compiled``; fullgraph for the MLP);
- ``torchao 8da4w`` / ``torchao 8da2w`` (``QATConfig`` with ``IntxFakeQuantizeConfig``: int8 per-token
  activations, int4 / int2 weights per group of 32), ``brevitas w3`` (every ``nn.Linear`` a Brevitas
  ``QuantLinear`` with 3-bit weights). Peers that are not installed (``pip install -e ".[bench]"``) are
  listed as skipped with the reason.

Each round times ``steps`` SGD steps of every variant, variants interleaved; the table gives the median step time
over rounds (wall clock), its spread (min..max), the ratio to fp32, and the median process CPU time per step (less
sensitive to other processes on a shared host). ``saved MB``: bytes autograd keeps for the backward in one step,
parameters and tensors of a parameter's shape (their quantized copies) left out: the activations.
``--memory`` adds the peak resident memory a step adds, each variant measured in a fresh process.
Threads: 2 (``--threads``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx


# -- models --------------------------------------------------------------------------------------------------------

def _mlp():
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def _convnet():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


class _LlamaLoss(nn.Module):
    """A tiny Llama returning its logits (the loss is taken by the step)."""

    def __init__(self):
        super().__init__()
        import transformers
        transformers.logging.set_verbosity_error()
        cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
        self.model = transformers.LlamaForCausalLM(cfg)

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def _mlp_batch():
    return torch.randn(256, 1024), torch.randint(0, 10, (256,))


def _llama_batch():
    ids = torch.randint(0, 2048, (4, 256))
    return ids, ids


def _convnet_batch():
    return torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


CASES = {"mlp": ("MLP 3x1024, batch 256", _mlp, _mlp_batch),
         "llama": ("tiny Llama h512 x4, seq 256, batch 4", _LlamaLoss, _llama_batch),
         "convnet": ("convnet, batch 64", _convnet, _convnet_batch)}


# -- variants: each takes the fp32 model (a copy) and returns (model, autocast dtype or None) ------------------------

def _ternary(train_kernel="fake_quant"):
    return dataclasses.replace(bfx.ternary(), train_kernel=train_kernel)


def _prepared(model, example, train_kernel):
    return bfx.prepare_qat(model, _ternary(train_kernel), example_inputs=(example,))


def _compiled(model, example, train_kernel, fullgraph, compile_fn=bfx.compile):
    return compile_fn(_prepared(model, example, train_kernel), fullgraph=fullgraph)


def _torchao(model, example, weight_dtype):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(weight_dtype, group_size=32)
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    return model


def _brevitas(model, example):
    from brevitas.nn import QuantLinear
    for name, child in list(model.named_modules()):
        for attr, leaf in list(child.named_children()):
            if type(leaf) is nn.Linear:
                q = QuantLinear(leaf.in_features, leaf.out_features, bias=leaf.bias is not None, weight_bit_width=3)
                q.load_state_dict(leaf.state_dict(), strict=False)
                setattr(child, attr, q)
    return model


def _peer(module: str):
    try:
        __import__(module)
        return None
    except Exception as e:  # noqa: BLE001  (any import failure: reported, not fatal)
        return f"{module} not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]}); pip install -e \".[bench]\""


VARIANTS = {
    "fp32": (lambda m, x, case: m, None, None),
    "bf16 autocast": (lambda m, x, case: m, torch.bfloat16, None),
    "bitlab ternary": (lambda m, x, case: _prepared(m, x, "fake_quant"), None, None),
    "bitlab ternary int8-fwd": (lambda m, x, case: _prepared(m, x, "int8"), None, None),
    "bitlab ternary compiled": (lambda m, x, case: _compiled(m, x, "fake_quant", case == "mlp"), None, None),
    "bitlab ternary int8-fwd compiled": (lambda m, x, case: _compiled(m, x, "int8", case == "mlp"), None, None),
    "bitlab ternary int8-fwd torch.compile": (
        lambda m, x, case: _compiled(m, x, "int8", case == "mlp", torch.compile), None, None),
    "fp32 compiled": (lambda m, x, case: bfx.compile(m, fullgraph=case == "mlp"), None, None),
    "torchao 8da4w": (lambda m, x, case: _torchao(m, x, torch.int4), None, "torchao"),
    "torchao 8da2w": (lambda m, x, case: _torchao(m, x, torch.int2), None, "torchao"),
    "brevitas w3": (lambda m, x, case: _brevitas(m, x), None, "brevitas"),
}


# -- measuring -----------------------------------------------------------------------------------------------------

def _step(model, opt, x, y, autocast):
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _time_steps(model, opt, x, y, autocast, steps: int):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _step(model, opt, x, y, autocast)
    return (time.perf_counter() - wall) / steps * 1e3, (time.process_time() - cpu) / steps * 1e3


def saved_activation_bytes(model, x, y, autocast=None) -> int:
    """Bytes autograd keeps for one step's backward (each storage once), without the parameters and tensors of a
    parameter's shape (their quantized values or codes): the saved activations."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.device.type == "cpu" and t.layout == torch.strided:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and tuple(t.shape) not in weight_shapes:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _build(case: str, variant: str):
    _, make, batch = CASES[case]
    torch.manual_seed(0)
    base = make()
    x, y = batch()
    build, autocast, needs = VARIANTS[variant]
    return build(copy.deepcopy(base), x, case), autocast, x, y


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _memory_one(case: str, variant: str) -> None:
    """(child process) Peak resident memory three steps add to the built model, in MB, printed as JSON. The peak
    is this process's own high-water mark (``VmHWM``, reset first where Linux allows it; ``ru_maxrss`` would
    carry the parent's size over ``exec``)."""
    model, autocast, x, y = _build(case, variant)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _status_kb("VmRSS")
    for _ in range(3):
        _step(model, opt, x, y, autocast)
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def _memory(case: str, variant: str, threads: int) -> str:
    cmd = [sys.executable, __file__, "--memory-one", case, variant, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    try:
        return f"{json.loads(done.stdout.strip().splitlines()[-1])['peak_mb']:.0f}"
    except Exception:  # noqa: BLE001
        return "failed"


def run_case(case: str, variants, rounds: int, steps: int, memory: bool, threads: int) -> None:
    title = CASES[case][0]
    models, skipped = {}, {}
    for name in variants:
        reason = VARIANTS[name][2] and _peer(VARIANTS[name][2])
        if reason:
            skipped[name] = reason
            continue
        try:
            model, autocast, x, y = _build(case, name)
        except Exception as e:  # noqa: BLE001  (a peer that cannot take this model: reported)
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            continue
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for _ in range(2):  # warm-up (compiles the compiled variants)
            _step(model, opt, x, y, autocast)
        models[name] = (model, opt, autocast, x, y)
    wall = {n: [] for n in models}
    cpu = {n: [] for n in models}
    for _ in range(rounds):
        for name, (model, opt, autocast, x, y) in models.items():
            w, c = _time_steps(model, opt, x, y, autocast, steps)
            wall[name].append(w)
            cpu[name].append(c)
    base = statistics.median(wall["fp32"]) if "fp32" in wall else None
    base_cpu = statistics.median(cpu["fp32"]) if "fp32" in cpu else None
    saved_fp32 = None
    for name, (model, opt, autocast, x, y) in models.items():
        med, cmed = statistics.median(wall[name]), statistics.median(cpu[name])
        saved = saved_activation_bytes(model, x, y, autocast)
        saved_fp32 = saved if name == "fp32" else saved_fp32
        ratio = f"{med / base:.2f}x" if base else "-"
        cpu_ratio = f"{cmed / base_cpu:.2f}x" if base_cpu else "-"
        saved_ratio = f" ({saved / saved_fp32:.2f}x)" if saved_fp32 else ""
        peak = _memory(case, name, threads) if memory and "compiled" not in name else "-"
        print(f"| {title} | {name} | {med:.1f} | {min(wall[name]):.1f}..{max(wall[name]):.1f} | {ratio} | "
              f"{cmed:.1f} ({cpu_ratio}) | {saved / 2**20:.1f}{saved_ratio} | {peak} |", flush=True)
    for name, reason in skipped.items():
        print(f"| {title} | {name} | skipped: {reason} | | | | | |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="mlp,llama")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--memory", action="store_true", help="peak RSS of a step, each variant in a fresh process")
    ap.add_argument("--memory-one", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_one:
        _memory_one(*args.memory_one)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {torch.backends.cpu.get_cpu_capability()}")
    print("| model | variant | step ms (median) | spread ms | vs fp32 | CPU ms/step (vs fp32) | saved MB (vs fp32) | "
          "peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        run_case(case.strip(), variants, args.rounds, args.steps, args.memory, args.threads)


if __name__ == "__main__":
    main()
