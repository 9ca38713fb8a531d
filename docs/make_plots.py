"""Make the PNG plots of the docs from the JSON results the examples and benchmarks write.

    pip install -e .[docs,examples]
    python docs/make_plots.py            # plots from the JSON files already in docs/img/
    python docs/make_plots.py --run      # first re-run the examples (about 12 minutes on 2 CPU cores)

Inputs (each plot is skipped, with a message, when its input is missing):

- ``docs/img/quickstart.json``, ``docs/img/lenet.json``, ``docs/img/char_lm.json``: written by
  ``python examples/<name>.py --json docs/img/<name>.json`` (accuracy or perplexity per epoch/step, sizes).
- ``docs/img/qat_llm.json``: ``python examples/qat_pretrained_lm.py --json docs/img/qat_llm.json`` (SmolLM2 QAT:
  the table, loss and perplexity-vs-tokens curves; about 30 min on 2 cores, not part of ``--run``).
- ``benchmarks/results/bench_linear.json``: the CPU kernel benchmark. A list of rows (or ``{"rows": [...]}``),
  each a dict with the columns of its table: ``"N x K"``, ``"M"`` (batch), ``"fp32 us"``, ``"bitlab us"``
  (``"x fp32"`` is used when present).

Outputs in ``docs/img/``: ``accuracy_curves.png``, ``model_size.png``, ``cpu_speed.png``, ``qat_llm.png``.
Not imported by the tests (matplotlib is an optional extra: ``docs = ["matplotlib"]``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
BENCH = ROOT / "benchmarks" / "results" / "bench_linear.json"
COLORS = {"fp32": "#444444", "ternary": "#d62728", "warm": "#1f77b4", "learned": "#2ca02c"}


def load(name: str):
    path = IMG / f"{name}.json"
    if not path.exists():
        print(f"skip {name}: {path.relative_to(ROOT)} not found (python examples/{name}.py --json {path.relative_to(ROOT)})")
        return None
    return json.loads(path.read_text())


def run_examples() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import char_lm, lenet, quickstart  # noqa: E401  (the examples' own main functions)

    for mod, name in ((quickstart, "quickstart"), (lenet, "lenet"), (char_lm, "char_lm")):
        print(f"== examples/{name}.py", flush=True)
        mod.main(["--json", str(IMG / f"{name}.json")])


def _color(label: str) -> str:
    low = label.lower()
    if "learned" in low:
        return COLORS["learned"]
    if "warm" in low:
        return COLORS["warm"]
    return COLORS["fp32"] if low.startswith("fp32") else COLORS["ternary"]


def plot_curves(plt) -> None:
    panels = [(name, load(name)) for name in ("char_lm", "quickstart", "lenet")]
    panels = [(n, d) for n, d in panels if d is not None]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (name, d) in zip(axes[0], panels):
        if name == "char_lm":
            for label, pts in d["curves"].items():
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, color=_color(label), lw=1.6)
            a = d["args"]
            ax.set(title=f"char-LM (d={a['dim']}, {a['layers']} layers)", xlabel="training step",
                   ylabel="validation perplexity (bytes)", yscale="log")
            final = min(v for k, v in d["perplexity"].items() if k.startswith("ternary"))
            ax.set_ylim(d["perplexity"]["fp32"] * 0.9, final * 3)
        else:
            offset = 0
            for label, pts in d["curves"].items():  # QAT fine-tunes the fp32 model: its epochs follow
                if pts:
                    ax.plot([offset + p[0] for p in pts], [p[1] for p in pts], label=label, color=_color(label), lw=1.6)
                    offset += pts[-1][0]
            title = "digits MLP, ternary" if name == "quickstart" else "LeNet-5, W3A4"
            ax.set(title=title, xlabel="epoch (QAT starts from the fp32 weights)", ylabel="test accuracy %")
            accs = [p[1] for pts in d["curves"].values() for p in pts]
            ax.set_ylim(max(min(accs), 80), 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, "accuracy_curves.png")


def plot_sizes(plt) -> None:
    data = [(n, load(n)) for n in ("quickstart", "lenet", "char_lm")]
    data = [(n, d["sizes"]) for n, d in data if d is not None]
    if not data:
        return
    labels = {"quickstart": "digits MLP\n(ternary)", "lenet": "LeNet-5\n(W3A4)", "char_lm": "char-LM\n(ternary)"}
    fig, ax = plt.subplots(figsize=(6, 3.3))
    xs = range(len(data))
    fp = [s["fp32"] / 1024 for _, s in data]
    cv = [s["converted"] / 1024 for _, s in data]
    ax.bar([x - 0.2 for x in xs], fp, 0.4, label="fp32 state_dict", color=COLORS["fp32"])
    ax.bar([x + 0.2 for x in xs], cv, 0.4, label="converted", color=COLORS["ternary"])
    for x, a, b in zip(xs, fp, cv):
        ax.text(x + 0.2, b, f"{a / b:.1f}x\nsmaller", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [labels[n] for n, _ in data])
    ax.set(ylabel="saved size (KiB)", title="Model size: fp32 vs converted", ylim=(0, max(fp) * 1.15))
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, "model_size.png")


def _bench_rows():
    if not BENCH.exists():
        print(f"skip cpu_speed.png: {BENCH.relative_to(ROOT)} not found (the CPU kernel benchmark writes it)")
        return None
    raw = json.loads(BENCH.read_text())
    rows = raw.get("rows", raw) if isinstance(raw, dict) else raw
    out = []
    for r in rows:
        shape = r.get("N x K") or r.get("shape")
        m = r.get("M", r.get("batch"))
        speedup = r.get("x fp32")
        if speedup is None and r.get("fp32 us") and r.get("bitlab us"):
            speedup = float(r["fp32 us"]) / float(r["bitlab us"])
        if shape is not None and m is not None and speedup is not None:
            out.append((str(shape), int(m), float(speedup)))
    if not out:
        print(f"skip cpu_speed.png: no rows with 'N x K', 'M' and 'x fp32' (or 'fp32 us' and 'bitlab us') in {BENCH}")
        return None
    return out


def plot_speed(plt) -> None:
    rows = _bench_rows()
    if rows is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for shape in dict.fromkeys(r[0] for r in rows):
        pts = sorted((m, s) for sh, m, s in rows if sh == shape)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=shape, lw=1.4)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="batch M (tokens)", ylabel="speed vs fp32 F.linear (x)",
           title="CPU ternary linear vs fp32, by batch size")
    ax.set_xticks(sorted({r[1] for r in rows}), [str(m) for m in sorted({r[1] for r in rows})])
    ax.grid(alpha=0.3)
    ax.legend(title="N x K", fontsize=8)
    fig.tight_layout()
    _save(fig, "cpu_speed.png")


def plot_qat_llm(plt) -> None:
    """docs/img/qat_llm.png from qat_llm.json (examples/qat_pretrained_lm.py): distillation loss per step and
    held-out perplexity vs training tokens per format, with the fp32 and PTQ perplexities as lines."""
    d = load("qat_llm")
    if d is None:
        return
    rows = {r["model"]: r for r in d["rows"]}
    fig, (loss_ax, ppl_ax, zoom_ax) = plt.subplots(1, 3, figsize=(13.5, 3.5))
    for i, (fmt, curves) in enumerate(d["curves"].items()):
        color = f"C{i}"
        loss_ax.plot([p[0] for p in curves["loss"]], [p[2] for p in curves["loss"]], label=fmt, color=color, lw=1.2)
        pts = curves["ppl_vs_tokens"]
        if f"{fmt} PTQ" in rows:  # PTQ is the QAT curve's start: 0 training tokens
            pts = [(0, rows[f"{fmt} PTQ"]["ppl"])] + pts
        ppl_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{fmt} QAT", color=color, lw=1.4)
        if max(p[1] for p in pts) < 10 * rows["fp32"]["ppl"]:  # the formats near fp32, on a linear scale
            zoom_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{fmt} QAT", color=color, lw=1.4)
        if f"{fmt} PTQ" in rows:
            ppl_ax.axhline(rows[f"{fmt} PTQ"]["ppl"], color=color, lw=0.8, ls=":", label=f"{fmt} PTQ")
    for ax in (ppl_ax, zoom_ax):
        ax.axhline(rows["fp32"]["ppl"], color="black", lw=0.9, ls="--", label="fp32")
    zoom_ax.set(xlabel="training tokens", ylabel="held-out perplexity", title="W4A8 / W8A8 (first point: PTQ)")
    loss_ax.set(xlabel="optimizer step", ylabel="KL(teacher || student)", yscale="log",
                title="Distillation loss (SmolLM2-135M)")
    ppl_ax.set(xlabel="training tokens", ylabel="held-out perplexity", yscale="log",
               title="Held-out perplexity vs training tokens")
    for ax in (loss_ax, ppl_ax, zoom_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, "qat_llm.png")


def _save(fig, name: str) -> None:
    path = IMG / name
    fig.savefig(path, dpi=90)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="re-run the examples to refresh their JSON first")
    args = ap.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        sys.exit("matplotlib is not installed: pip install -e .[docs]")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    if args.run:
        run_examples()
    plot_curves(plt)
    plot_sizes(plt)
    plot_speed(plt)
    plot_qat_llm(plt)


if __name__ == "__main__":
    main()
