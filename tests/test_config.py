import pytest

import bitlab_fx as bfx


def test_presets_are_the_bitnet_recipe():
    c = bfx.ternary()
    assert c.weight == bfx.TernaryWeight("per_channel", "absmean")
    assert c.input == bfx.IntActivation(8, True, "per_token", True)
    assert bfx.int8().weight == bfx.IntWeight(8, "per_channel")


def test_string_shorthands():
    c = bfx.QuantConfig(weight="ternary", input="uint4")
    assert isinstance(c.weight, bfx.TernaryWeight)
    assert c.input.bits == 4 and not c.input.signed
    assert bfx.QuantConfig(weight="int3").weight.bits == 3
    assert bfx.TernaryWeight("per_group:64").granularity == bfx.PerGroup(64)
    assert bfx.QuantConfig(weight="int8", input="int8", bias="int8").bias == bfx.IntBias(8)


@pytest.mark.parametrize("make", [
    lambda: bfx.IntWeight(bits=9),
    lambda: bfx.IntWeight(bits=1),
    lambda: bfx.IntActivation(bits=0),
    lambda: bfx.TernaryWeight(granularity="per_token"),
    lambda: bfx.TernaryWeight(scale="median"),
    lambda: bfx.IntActivation(granularity="per_channel"),
    lambda: bfx.IntActivation(granularity=bfx.PerGroup(8)),
    lambda: bfx.IntActivation(dynamic=False, granularity="per_token"),
    lambda: bfx.PerGroup(0),
    lambda: bfx.PerGroup(2.5),
    lambda: bfx.QuantConfig(weight="int9"),
    lambda: bfx.QuantConfig(input="fp4"),
    lambda: bfx.QuantConfig(input="int8", bias="int8"),  # an IntBias needs a quantized weight (its step's other half)
])
def test_invalid_configs_raise_config_error(make):
    with pytest.raises(bfx.ConfigError):
        make()


def test_configs_are_frozen():
    c = bfx.ternary()
    with pytest.raises(Exception):
        c.weight = None


def test_to_dict_round_trip():
    c = bfx.QuantConfig(weight=bfx.TernaryWeight(bfx.PerGroup(32)), input=bfx.IntActivation(4, False, "per_tensor", False),
                        output=bfx.IntActivation(8), bias=bfx.IntBias(8))
    assert bfx.QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(bfx.ConfigError, match="unknown field"):
        bfx.QuantConfig.from_dict({"weights": None})
    with pytest.raises(bfx.ConfigError, match="unknown type"):
        bfx.QuantConfig.from_dict({"weight": {"type": "FloatWeight"}})


def test_describe():
    assert bfx.ternary().describe() == "W1.58(per_channel) A8(per_token)"
    assert bfx.QuantConfig().describe() == "float"


def test_int_bias_without_input_quantizer_is_a_valid_config():
    """The input step comes from whatever quantizes the layer's input, found at prepare time."""
    c = bfx.QuantConfig(weight=bfx.IntWeight(3), bias=bfx.IntBias(8))
    assert c.input is None and c.bias == bfx.IntBias(8)
    assert bfx.QuantConfig.from_dict(c.to_dict()) == c

