"""Per-layer tables of prepared and converted models: formats, rules, sizes.

>>> import torch, bitlab_fx as bfx
>>> pm = bfx.prepare_qat(torch.nn.Sequential(torch.nn.Linear(256, 64)), bfx.ternary())
>>> s = bfx.summary(pm)
>>> s.rows[0]["weight"], s.rows[0]["rule"]
('ternary', '"global"')
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from tabulate import tabulate
from torch import fx, nn

from .errors import ConfigError
from .float_weights import float_weights
from .nn.quantized import _QuantizedBase
from .passes.embeddings import embedding_rows
from .passes.experts import experts_rows, experts_skipped
from .passes._common import META, RECORD_KEY, LayerMeta, bitlab_meta, layer_nodes, layer_weight, stage_of
from .quant import primitives as P
from .quant.formats import converted_weight_bytes

COLUMNS = ["layer", "type", "weight", "w_granularity", "activation", "input_scale", "rule", "params", "bytes_fp32",
           "bytes_quant", "zeros"]


def _type_name(t: Any) -> str:
    if isinstance(t, type):
        return t.__name__
    return f"F.{getattr(t, '__name__', str(t))}"


def _act_label(spec) -> str:
    if spec is None:
        return "float"
    return f"{spec.format} {spec.granularity}{'' if spec.dynamic else ' static'}{' learned' if spec.learned else ''}"


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _row(gm: fx.GraphModule, node: fx.Node, meta: LayerMeta) -> Dict[str, Any]:
    row = {"layer": meta.fqn, "type": _type_name(meta.object_type), "weight": "float", "w_granularity": "",
           "activation": "float", "input_scale": meta.input_scale or "",
           "rule": "" if meta.rule is None else str(meta.rule), "zeros": ""}
    if meta.container is not None:  # converted
        c: _QuantizedBase = gm.get_submodule(meta.container)
        n_params = math.prod(c.weight_shape) + (0 if c.stored_bias is None else c.stored_bias.numel())
        row.update(weight=c.spec.format, w_granularity=str(c.spec.granularity), params=n_params,
                   bytes_fp32=4 * n_params, bytes_quant=c.packed_bytes(), zeros=f"{c.zero_fraction:.1%}")
        a = meta.config.input if meta.config is not None else None
        row["activation"] = meta.input_from or (_act_label(a) + (" (fused)" if c.act != "none" and a is not None else ""))
        return row
    weight = layer_weight(gm, meta)
    bias = gm.get_parameter(meta.bias) if meta.bias else None
    n_params = weight.numel() + (0 if bias is None else bias.numel())
    row.update(params=n_params, bytes_fp32=4 * n_params, bytes_quant=_nbytes(weight) + _nbytes(bias))
    cfg = meta.config
    if cfg is not None and cfg.weight is not None:
        w_arg = node.args[1]
        wfq = gm.get_submodule(w_arg.target) if isinstance(w_arg, fx.Node) and w_arg.op == "call_module" else None
        wq, _ = P.quantize_weight(weight, cfg.weight, wfq.step(weight) if getattr(wfq, "spec", None) is cfg.weight
                                  and cfg.weight.learned else None)
        row.update(weight=cfg.weight.format, w_granularity=str(cfg.weight.granularity),
                   bytes_quant=converted_weight_bytes(tuple(weight.shape), cfg.weight) + _nbytes(bias),
                   zeros=f"{(wq == 0).float().mean().item():.1%}")
    if cfg is not None:
        row["activation"] = meta.input_from or _act_label(cfg.input)
    return row


@dataclass
class Summary:
    """What :func:`summary` returns: ``rows`` (one dict per layer), ``totals``, ``skipped`` and a table as ``str()``.

    For partially traced models, ``traced`` maps each prepared part to ``"graph"`` (a traced submodule)
    or ``"layer"`` (a lone layer as its own graph), and ``untraced`` each module that did not trace
    (``""`` is the root) to the first line of why; ``eager_weights`` lists the matrices such modules own
    directly (``{"attn.w_qkv": [96, 32]}``): their functional uses cannot be seen without a graph, so they
    stay float. Mixture-of-experts experts have one row per 3-D weight (``<experts>.gate_up_proj``, quantized or
    float). ``float_weights`` maps every other parameter of two or more dims that no row covers (routers,
    ``nn.MultiheadAttention``, parametrized weights...) to ``(shape, reason)``
    (:mod:`bitlab_fx.float_weights`); ``totals["quantized_share"]`` counts them all, by parameters."""

    stage: str
    rows: List[Dict[str, Any]]
    skipped: Dict[str, str] = field(default_factory=dict)
    traced: Dict[str, str] = field(default_factory=dict)
    untraced: Dict[str, str] = field(default_factory=dict)
    eager_weights: Dict[str, List[int]] = field(default_factory=dict)
    float_weights: Dict[str, Tuple[List[int], str]] = field(default_factory=dict)

    @property
    def totals(self) -> Dict[str, Any]:
        """Counts over the rows; ``quantized_share``: quantized parameters over all matmul-shaped ones (the rows,
        ``eager_weights`` and ``float_weights``)."""
        before = sum(r["bytes_fp32"] for r in self.rows)
        after = sum(r["bytes_quant"] for r in self.rows)
        quantized = sum(r["params"] for r in self.rows if r["weight"] != "float")
        every = sum(r["params"] for r in self.rows) + sum(math.prod(s) for s in self.eager_weights.values()) + sum(
            math.prod(s) for s, _ in self.float_weights.values())
        return {"layers": len(self.rows), "quantized": sum(r["weight"] != "float" for r in self.rows),
                "params": sum(r["params"] for r in self.rows), "bytes_fp32": before, "bytes_quant": after,
                "compression": before / after if after else 1.0,  # nothing quantizable: nothing saved
                "quantized_share": quantized / every if every else 0.0}

    def __str__(self) -> str:
        t = self.totals
        body = [[r.get(c, "") for c in COLUMNS] for r in self.rows]
        if t["layers"]:
            body.append(["TOTAL", "", f"{t['quantized']}/{t['layers']} quantized", "", "", "", "", t["params"],
                         t["bytes_fp32"], t["bytes_quant"], f"{t['compression']:.1f}x smaller"])
        else:
            body.append(["TOTAL", "", "no quantizable layers", "", "", "", "", 0, 0, 0, "-"])
        text = f"bitlab_fx summary ({self.stage})\n" + tabulate(body, headers=COLUMNS, intfmt=",")
        if self.skipped:
            text += "\nleft float (unsupported): " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        if self.traced:
            graphs = [k for k, v in self.traced.items() if v == "graph"]
            text += (f"\ntraced as graphs ({len(graphs)}): {', '.join(graphs) or '-'}; "
                     f"lone layers as their own graphs: {len(self.traced) - len(graphs)}")
            text += "\nnot traced (kept eager):\n" + "\n".join(
                f"  {k or '(root)'}: {v}" for k, v in self.untraced.items())
        if self.eager_weights:
            n = sum(math.prod(s) for s in self.eager_weights.values())
            text += (f"\nfloat weights of untraced modules ({n:,} params, not in the table): "
                     + ", ".join(f"{k} {list(s)}" for k, s in self.eager_weights.items())
                     + "; make their module traceable, or wrap those uses in nn.Linear/nn.Conv modules")
        if self.float_weights:
            n = sum(math.prod(s) for s, _ in self.float_weights.values())
            text += f"\nother float weights ({n:,} params, not in the table):\n" + "\n".join(
                f"  {k} {list(s)}: {why}" for k, (s, why) in self.float_weights.items())
        text += f"\nquantized share of the matmul-shaped weights, by parameters: {t['quantized_share']:.1%}"
        return text

    __repr__ = __str__


def summary(model: nn.Module) -> Summary:
    """One row per layer that prepare_qat saw: name, type, weight format, granularity, activation
    quantization, where the input scale comes from (``"own input=static"``, ``"'relu1' via max_pool2d"``: an
    upstream quantizer reached through scale-preserving ops; ``"float"``), the mapping rule that matched, parameter count, bytes in fp32 and quantized
    (projected for prepared models, measured for converted ones) and the share of zero ternary weights."""
    stage = stage_of(model)
    if stage is not None and not isinstance(model, fx.GraphModule) and bitlab_meta(model).parts is not None:
        return _partial_summary(model, bitlab_meta(model))
    if stage is None or not isinstance(model, fx.GraphModule):
        raise ConfigError(f"summary: the {type(model).__name__} was not prepared by bfx.prepare_qat; "
                          "call it on the result of prepare_qat or convert")
    seen, rows = set(), []
    for node in layer_nodes(model):
        meta = node.meta[META]
        key = meta.weight
        if key in seen:  # a shared weight: one row
            continue
        seen.add(key)
        rows.append(_row(model, node, meta))
    rows += embedding_rows(model).values()
    experts = experts_rows(model, model.meta[RECORD_KEY].qconfig)
    rows += experts.values()
    skipped = {**model.meta[RECORD_KEY].skipped, **experts_skipped(model)}
    covered = {n for node in layer_nodes(model) for n in (node.meta[META].weight, node.meta[META].bias) if n}
    covered |= _experts_params(model, experts)
    return Summary(stage, rows, skipped, float_weights=float_weights(model, covered, known=skipped))


def _experts_params(model: nn.Module, experts: Dict[str, Dict[str, Any]]) -> set:
    """Parameter names the experts rows cover (a float experts weight and its bias)."""
    names = {n for n, _ in model.named_parameters()}
    return {n for row in experts for n in (row, f"{row}_bias") if n in names}


def _float_row(model: nn.Module, path: str, rule: str) -> Dict[str, Any]:
    m = model.get_submodule(path)
    n = sum(p.numel() for p in m.parameters(recurse=False))
    return {"layer": path, "type": type(m).__name__, "weight": "float", "w_granularity": "", "activation": "float",
            "input_scale": "", "rule": rule, "params": n, "bytes_fp32": 4 * n,
            "bytes_quant": sum(_nbytes(p) for p in m.parameters(recurse=False)), "zeros": ""}


def _partial_summary(model: nn.Module, record: dict) -> Summary:
    """Rows of every prepared part of a partially traced model, under the original names, in model order."""
    from .partial import qualify

    rows, skipped = {}, {}
    for path in record.parts:
        gm = model.get_submodule(path)
        layer_type = gm.meta[RECORD_KEY].layer_type
        seen = set()
        for node in layer_nodes(gm):
            meta = node.meta[META]
            if meta.weight not in seen:
                seen.add(meta.weight)
                row = _row(gm, node, meta)
                row.update(layer=qualify(path, meta.fqn), type=layer_type or row["type"])
                rows[row["layer"]] = row
        skipped.update({qualify(path, k): v for k, v in gm.meta[RECORD_KEY].skipped.items()})
    for path, rule in record.float_layers.items():
        rows[path] = _float_row(model, path, rule)
    skipped.update(record.skipped)  # lone layers kept float after prepare (e.g. weights read outside their call)
    covered = {qualify(path, n) for path in record.parts for node in layer_nodes(model.get_submodule(path))
               for n in (node.meta[META].weight, node.meta[META].bias) if n}
    rows.update(embedding_rows(model))
    experts = experts_rows(model, record.qconfig)
    rows.update(experts)
    skipped.update(experts_skipped(model))
    covered |= _experts_params(model, experts)
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    ordered = sorted(rows.values(), key=lambda r: order.get(r["layer"], order.get(  # experts rows: their module's place
        r["layer"].rpartition(".")[0], len(order))))
    eager = {qualify(path, name): list(p.shape) for path in record.untraced
             for name, p in model.get_submodule(path).named_parameters(recurse=False) if p.dim() >= 2}
    others = float_weights(model, covered | set(eager), set(record.untraced), set(record.float_layers), skipped)
    return Summary(record.stage, ordered, skipped, dict(record.parts), dict(record.untraced), eager, others)
