"""``bfx.export_onnx``: a converted model as ONNX for onnxruntime, weights kept at 2 / 4 / 8 bits.

``torch.onnx.export`` (the torch.export based exporter) captures the converted model; each
``torch.ops.bitlab`` op is translated here to standard ONNX ops for its activation quantization (the same
``s = 127 / max|x|`` per token or tensor, round half to even, clip to int8, ``/ s``) and one placeholder
node for the weight product, which :mod:`.onnx_lowering` then turns into ``MatMulNBits`` (linears) or
``DequantizeLinear`` + ``Conv`` (convs) on the layer's codes and steps. onnxruntime therefore computes the
product of the same int8 activation codes and weight codes, in fp32 instead of integers (outputs agree to
float rounding, ~1e-6 relative, except where a rounding tie flips one activation code: docs/deploy.md).
"""
from __future__ import annotations

import os
import warnings

import torch

from ..errors import ExportError
from .weights import check_converted

_OPSET = 18


def export_onnx(model: torch.nn.Module, path: str, example_inputs: tuple, example_kwargs: dict | None = None,
                dynamic_batch: bool = True) -> dict:
    """Write a converted model to ``path`` as ONNX; returns {layer: the ONNX nodes it became}.

    ``example_inputs`` (and ``example_kwargs``, e.g. ``attention_mask``) are what the model is called with;
    dimension 0 of every tensor input is the dynamic batch unless ``dynamic_batch=False``. Hugging Face
    models are exported without a KV cache (``use_cache=False``); for decoding with a cache, see
    :func:`bfx.export_onnx_decoder <bitlab_fx.export.onnx_decoder.export_onnx_decoder>`. Needs the ``export`` extra.

    >>> import torch, tempfile, os, bitlab_fx as bfx
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    >>> cm = bfx.convert(bfx.prepare_qat(mlp, bfx.ternary()).eval())
    >>> bfx.export_onnx(cm, os.path.join(tempfile.mkdtemp(), "mlp.onnx"), (torch.randn(2, 64),))["0"]
    'MatMulNBits(bits=2, block_size=128)'
    """
    check_converted(model, "ONNX")
    example_kwargs = dict(example_kwargs or {})
    model = model.eval()
    program = _export_without_cache(model, tuple(example_inputs), example_kwargs, dynamic_batch)
    if dynamic_batch:
        _check_dynamic_batch(program.model_proto, example_inputs, example_kwargs)
    return lower_and_save(program, path)


def lower_and_save(program, path: str) -> dict:
    """Lower the placeholders of an exported ``program`` (:mod:`.onnx_lowering`) and write it to ``path``;
    returns {layer: the ONNX nodes it became}."""
    import onnx

    from . import onnx_lowering

    proto = program.model_proto  # (a new proto each time it is read: lower and save this one)
    lowered = onnx_lowering.lower_placeholders(proto)
    onnx.save(proto, os.fspath(path))
    return lowered


def torch_onnx_export(model, example_inputs: tuple, example_kwargs: dict, shapes, **names):
    """``torch.onnx.export`` with the bitlab ops' translations (``names``: ``input_names`` / ``output_names``)."""
    from . import onnx_translations

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, example_inputs, kwargs=example_kwargs or None, dynamo=True,
                                 opset_version=_OPSET, dynamic_shapes=shapes, verbose=False,
                                 custom_translation_table=onnx_translations.table(), optimize=True, **names)


def _dynamic_shapes(example_inputs: tuple, example_kwargs: dict, dynamic_batch: bool):
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch")
    mark = lambda v: {0: batch} if isinstance(v, torch.Tensor) and v.dim() > 0 else None
    return tuple(mark(v) for v in example_inputs) + ({k: mark(v) for k, v in example_kwargs.items()},)


def _export_without_cache(model, example_inputs: tuple, example_kwargs: dict, dynamic_batch: bool):
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False  # decoders without a KV cache: the cache is not a tensor input ONNX holds
    shapes = _dynamic_shapes(example_inputs, example_kwargs, dynamic_batch)
    if shapes is not None and not example_kwargs:
        shapes = shapes[:-1]
    elif shapes is not None:
        shapes = {**dict(zip(_positional_names(model, len(example_inputs)), shapes[:-1])), **shapes[-1]}
    try:
        return torch_onnx_export(model, example_inputs, example_kwargs, shapes)
    except Exception as err:  # torch.export's constraint errors, the ONNX exporter's conversion errors
        text = str(err)
        if dynamic_batch and ("batch" in text or "Constraint" in text or "specializ" in text):
            raise ExportError(f"export_onnx: the model cannot take a dynamic batch size ({text.splitlines()[0][:300]}); "
                              "export with dynamic_batch=False (a fixed batch of the example's size), or make the "
                              "code that fixes the batch size depend on the input's shape") from err
        raise ExportError(f"export_onnx: torch.onnx.export failed: {text.splitlines()[0][:500]}; check that the "
                          "converted model runs under torch.export.export(model, example_inputs)") from err
    finally:
        if use_cache:
            config.use_cache = use_cache


def _positional_names(model, count: int) -> list:
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in params[:count]]



def _check_dynamic_batch(proto, example_inputs: tuple, example_kwargs: dict) -> None:
    """Raise where the exporter fixed the batch size of a tensor input (the model's code specialised it)."""
    fixed = [i.name for i in proto.graph.input
             if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if not fixed:
        return
    examples = [v for v in (*example_inputs, *example_kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()]
    if any(v.shape[0] == 1 for v in examples):
        raise ExportError(f"export_onnx: the example inputs have a batch of 1, which torch.export may take as a "
                          f"fixed size (it did for inputs {fixed}); give examples with a batch of 2 or more for a dynamic batch, or "
                          "pass dynamic_batch=False")
    raise ExportError(f"export_onnx: the model cannot take a dynamic batch size: torch.export fixed dimension 0 "
                      f"of input(s) {fixed} to the example's; export with dynamic_batch=False (a fixed batch of "
                      "the example's size), or make the code that fixes the batch size depend on the input's shape")
