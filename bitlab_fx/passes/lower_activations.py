"""Convert step for activation quantizers left in the graph after the layers are lowered.

An int8 signed input quantizer is fused into its layer's op (``act="per_token"``...). Every other
activation quantizer (lower bits, unsigned, outputs of ReLUs, the model input) becomes one fused
quantize-dequantize op with its static multiplier stored as a buffer::

    relu1_output_fq = call_module[relu1_output_fq](relu1)
    ->  relu1_output = call_function[bitlab.quantize_dequantize](relu1, get_attr[relu1_output_multiplier], 4, False, ...)

The op computes exactly what the fake quantizer computes in eval mode, so converted == prepared.
"""
from __future__ import annotations

import warnings

import torch
from torch import fx

from ..quant.fake_quant import ActivationFakeQuant
from ._common import unique_name


def _static_multiplier(fq: ActivationFakeQuant, where: str, warn: bool = True) -> torch.Tensor:
    """The frozen multiplier of a static quantizer (a warning when it never saw data: its range is empty)."""
    if warn and float(fq.running_amax) == 0.0:
        warnings.warn(f"bitlab_fx {where}: the static activation quantizer of {fq.layer!r} (rule {fq.rule}) never saw "
                      "data, so it has no range and will clamp everything to zero: before bfx.convert, train the "
                      "prepared model, or run a few calibration batches through it inside `with bfx.calibrate(model):`",
                      UserWarning, stacklevel=4)
    return fq.multiplier(torch.empty(0)).detach().float().reshape(1).clone()


def _lower_one(gm: fx.GraphModule, node: fx.Node, fq: ActivationFakeQuant) -> None:
    spec = fq.spec
    if not fq.enabled:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return
    with gm.graph.inserting_before(node):
        scale = None
        if not spec.dynamic:
            name = unique_name(gm, node.target.replace("_fq", "_multiplier"))
            gm.register_buffer(name, _static_multiplier(fq, f"convert: {node.target}"))
            scale = gm.graph.get_attr(name)
        new = gm.graph.call_function(torch.ops.bitlab.quantize_dequantize.default,
                                     (node.args[0], scale, spec.bits, spec.signed, spec.granularity, fq.token_dims))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def lower_activation_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each remaining ``ActivationFakeQuant`` call with ``bitlab.quantize_dequantize``."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            fq = gm.get_submodule(node.target)
            if isinstance(fq, ActivationFakeQuant):
                _lower_one(gm, node, fq)
    return gm
