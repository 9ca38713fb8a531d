"""The stored weight formats: which specs use which, what they store, and what the summary projects."""
import math

import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.nn import QuantizedLinear
from bitlab_fx.quant.formats import WEIGHT_FORMATS, converted_weight_bytes, format_of


@pytest.mark.parametrize("spec, name", [(bfx.TernaryWeight(), "ternary"), (bfx.IntWeight(2), "int4"),
                                        (bfx.IntWeight(4), "int4"), (bfx.IntWeight(5), "int8"),
                                        (bfx.IntWeight(8), "int8")])
def test_format_of_spec_and_stored_bytes_are_what_a_container_stores(spec, name):
    assert format_of(spec) is WEIGHT_FORMATS[name]
    torch.manual_seed(0)
    w = torch.randn(6, 75)
    layer = QuantizedLinear(w, None, spec)
    stored = layer.stored_weight
    assert layer.weight_format == name and stored.numel() * stored.element_size() == format_of(spec).stored_bytes(6, 75)
    steps = layer.weight_scale.numel() * 4
    assert converted_weight_bytes((6, 75), spec) == stored.numel() * stored.element_size() + steps


@pytest.mark.parametrize("name", list(WEIGHT_FORMATS))
def test_store_then_load_gives_the_codes_back(name):
    fmt = WEIGHT_FORMATS[name]
    low = {"ternary": -1, "int4": -8, "int8": -127}[name]
    codes = torch.randint(low, -low + 1 if name != "int4" else 8, (5, 131), dtype=torch.int8)
    assert torch.equal(fmt.load(fmt.store(codes), 131), codes)
    assert fmt.op("linear") is getattr(torch.ops.bitlab, f"{name}_linear").default
    assert math.prod(fmt.store(codes).shape) * fmt.store(codes).element_size() == fmt.stored_bytes(5, 131)
