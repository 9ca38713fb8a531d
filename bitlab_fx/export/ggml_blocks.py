"""A converted layer's codes and steps as ggml quantized blocks (the tensor data of a GGUF file).

Every ggml type used here stores one fp16 scale ``d`` per block of ``block`` weights and integer codes
``q`` with ``w = q * d``; bitlab_fx stores ``w = code * step``. So a layer becomes a ggml tensor without
re-quantizing: each block takes its codes unchanged and ``d = fp16(step)`` of the group it lies in. That
needs rows (and groups) that are whole blocks:

=========  ======  ===================================  ==========================================
type       block   bytes per block                      holds
=========  ======  ===================================  ==========================================
TQ2_0      256     64 code bytes + fp16 d               ternary (bitlab's packed bytes, unchanged)
TQ1_0      256     48 + 4 base-3 bytes + fp16 d         ternary
Q8_0       32      fp16 d + 32 int8                     any codes in [-127, 127]: ternary, int4, int8
Q4_0       32      fp16 d + 16 bytes (code + 8 nibbles) int4 codes in [-8, 7]
F16 / F32  1       the dequantized weight               anything (F16 rounds the weight)
=========  ======  ===================================  ==========================================

:func:`encode` picks the type asked for, and the next one down this list that fits the shape when it does
not (:data:`FALLBACK`); it says which it wrote.
"""
from __future__ import annotations

import numpy as np

from .weights import LayerWeight

BLOCK = {"TQ2_0": 256, "TQ1_0": 256, "Q8_0": 32, "Q4_0": 32, "F16": 1, "F32": 1}
# the exact types to try, best first, for each stored weight format and the first choice asked for
FALLBACK = {"TQ2_0": ("TQ2_0", "Q8_0", "F16"), "TQ1_0": ("TQ1_0", "Q8_0", "F16"),
            "Q4_0": ("Q4_0", "Q8_0", "F16"), "Q8_0": ("Q8_0", "F16"), "F16": ("F16",), "F32": ("F32",)}


def fits(layer: LayerWeight, ggml_type: str) -> bool:
    """Whether every block of ``ggml_type`` lies inside one row and one step group of ``layer``."""
    return layer.group % BLOCK[ggml_type] == 0


def encode(layer: LayerWeight, ggml_type: str) -> tuple[str, np.ndarray]:
    """(type written, data): ``layer`` as ``ggml_type``, or as the first type of ``FALLBACK[ggml_type]`` that
    fits its row length and groups. Quantized data is uint8 ``[N, bytes per row]``; F16/F32 the float weight."""
    chosen = next(t for t in FALLBACK[ggml_type] if fits(layer, t))
    if chosen in ("F16", "F32"):
        dense = layer.dequantized().reshape(layer.codes.shape).numpy()
        return chosen, dense.astype(np.float16 if chosen == "F16" else np.float32)
    return chosen, _ENCODERS[chosen](layer)


def _block_scales(layer: LayerWeight, block: int) -> np.ndarray:
    """fp16 ``d`` of every block, as bytes ``[N, K // block, 2]``: the step of the group the block lies in."""
    per_block = layer.steps.repeat_interleave(layer.group // block, dim=1)
    return per_block.numpy().astype(np.float16).view(np.uint8).reshape(*per_block.shape, 2)


def _blocks(layer: LayerWeight, block: int) -> np.ndarray:
    """Codes as int8 ``[N, K // block, block]``."""
    n, k = layer.codes.shape
    return layer.codes.numpy().astype(np.int8).reshape(n, k // block, block)


def _rows(parts: list) -> np.ndarray:
    """Concatenate per-block byte arrays ``[N, blocks, *]`` into rows ``[N, bytes per row]``."""
    data = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(data.reshape(data.shape[0], -1))


def _tq2_0(layer: LayerWeight) -> np.ndarray:
    # bitlab's packed layout is TQ2_0's: in each 128 codes, byte j holds codes j, j+32, j+64, j+96 (2 bits each,
    # code + 1); rows of a multiple of 256 are not padded, so each block is 64 packed bytes as they are
    n, k = layer.codes.shape
    packed = layer.packed_ternary
    if packed is None or packed.shape[1] * 4 != k:  # (a row permutation keeps them; only padding would differ)
        from ..quant.packing import pack_ternary
        packed = pack_ternary(layer.codes)
    qs = packed.numpy().reshape(n, k // 256, 64)
    return _rows([qs, _block_scales(layer, 256)])


def _tq1_0(layer: LayerWeight) -> np.ndarray:
    # five base-3 digits per byte, a layout gguf-py implements; fed the codes with d = 1 it stores them as they are
    import gguf

    blocks = _blocks(layer, 256)
    unit = gguf.quants.quantize(blocks.reshape(-1, 256).astype(np.float32), gguf.GGMLQuantizationType.TQ1_0)
    qs = unit.reshape(*blocks.shape[:2], -1)[..., :-2]  # drop gguf-py's d (the block's max |code|, 1 or 0)
    return _rows([qs, _block_scales(layer, 256)])


def _q8_0(layer: LayerWeight) -> np.ndarray:
    return _rows([_block_scales(layer, 32), _blocks(layer, 32).view(np.uint8)])


def _q4_0(layer: LayerWeight) -> np.ndarray:
    # nibble = code + 8; byte j of a block holds weights j (low nibble) and j + 16 (high nibble)
    nibbles = (_blocks(layer, 32).astype(np.int16) + 8).astype(np.uint8)
    qs = nibbles[..., :16] | (nibbles[..., 16:] << np.uint8(4))
    return _rows([_block_scales(layer, 32), qs])


_ENCODERS = {"TQ2_0": _tq2_0, "TQ1_0": _tq1_0, "Q8_0": _q8_0, "Q4_0": _q4_0}


def first_choice(weight_format: str, ternary_type: str) -> str:
    """The ggml type a stored weight format goes to first: ternary -> TQ2_0/TQ1_0, int4 -> Q4_0, int8 -> Q8_0."""
    return {"ternary": ternary_type, "int4": "Q4_0", "int8": "Q8_0"}[weight_format]
