import json
import warnings

import pytest
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx

T, I8 = bfx.ternary(), bfx.int8()


def test_priority_global_type_regex_name():
    qc = (bfx.QConfigMapping().set_global(T).set_object_type(nn.Conv2d, I8)
          .set_module_name_regex(r"blocks\.\d+\.attn.*", bfx.weight_only("int4"))
          .set_module_name("blocks.0.attn.q", None))
    assert qc.resolve("fc", nn.Linear)[0] == T
    assert qc.resolve("stem", nn.Conv2d)[0] == I8
    # regex beats object type
    assert qc.resolve("blocks.1.attn.conv", nn.Conv2d)[0].weight.bits == 4
    # module name beats regex; None excludes
    cfg, rule = qc.resolve("blocks.0.attn.q", nn.Linear)
    assert cfg is None and rule.kind == "module_name"


def test_regex_first_match_in_insertion_order_and_fullmatch():
    qc = bfx.QConfigMapping().set_module_name_regex(r"layer\..*", T).set_module_name_regex(r"layer\.1", I8)
    assert qc.resolve("layer.1", nn.Linear)[0] == T
    assert qc.resolve("xlayer.1", nn.Linear) == (None, None)  # fullmatch, not search


def test_object_type_matches_subclasses_and_functionals():
    class MyLinear(nn.Linear):
        pass
    qc = bfx.QConfigMapping().set_object_type(nn.Linear, T).set_object_type(F.linear, I8)
    assert qc.resolve("a", MyLinear)[0] == T
    assert qc.resolve("b", F.linear)[0] == I8
    assert qc.resolve("c", nn.Conv2d) == (None, None)


def test_most_specific_object_type_wins_whatever_the_insertion_order():
    class MyLinear(nn.Linear):
        pass

    class Mine(MyLinear):
        pass

    for order in ((nn.Linear, MyLinear), (MyLinear, nn.Linear)):
        qc = bfx.QConfigMapping()
        for t in order:
            qc.set_object_type(t, bfx.int8() if t is MyLinear else bfx.ternary())
        assert qc.resolve("a", MyLinear)[1].key is MyLinear
        assert qc.resolve("b", Mine)[1].key is MyLinear  # closer in the MRO than nn.Linear
        assert qc.resolve("c", nn.Linear)[1].key is nn.Linear
    qc = bfx.QConfigMapping().set_object_type(nn.Linear, bfx.ternary()).set_object_type(MyLinear, bfx.int8())
    model = nn.Sequential(MyLinear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "object_type(MyLinear) matched no layer"
        pm = bfx.prepare_qat(model, qc)
    assert [r["weight"] for r in bfx.summary(pm).rows] == ["int8", "ternary"]


def test_unused_rule_warns_naming_it():
    model = nn.Sequential(nn.Linear(8, 8))
    qc = bfx.QConfigMapping().set_global(T).set_module_name("haed", None)
    with pytest.warns(UserWarning, match=r"module_name\('haed'\) matched no layer"):
        bfx.prepare_qat(model, qc)


def test_used_rules_do_not_warn():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    qc = bfx.QConfigMapping().set_global(T).set_module_name("1", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bfx.prepare_qat(model, qc)


def test_to_dict_from_dict_json_round_trip():
    qc = (bfx.QConfigMapping().set_global(T).set_object_type(nn.Conv2d, I8)
          .set_module_name_regex(".*head", None).set_module_name("fc", bfx.ternary("per_tensor")))
    d = json.loads(json.dumps(qc.to_dict()))
    back = bfx.QConfigMapping.from_dict(d)
    for fqn, t in [("x", nn.Linear), ("c", nn.Conv2d), ("lm_head", nn.Linear), ("fc", nn.Linear)]:
        assert back.resolve(fqn, t)[0] == qc.resolve(fqn, t)[0]
    assert [str(r) for r in back.rules()] == [str(r) for r in qc.rules()]


def test_bad_mapping_input():
    with pytest.raises(bfx.ConfigError, match="regular expression"):
        bfx.QConfigMapping().set_module_name_regex("(", T)
    with pytest.raises(bfx.ConfigError, match="expected a bfx.QuantConfig"):
        bfx.QConfigMapping().set_global("ternary")
    with pytest.raises(bfx.ConfigError, match="cannot import"):
        bfx.QConfigMapping.from_dict({"object_type": [["torch.nn.Lineer", None]]})


def test_set_module_name_covers_the_subtree_like_torch_ao():
    import warnings

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    model = nn.Sequential(nn.Sequential(Block(), Block()), nn.Linear(8, 2))
    qc = (bfx.QConfigMapping().set_global(bfx.ternary())
          .set_module_name("0", None)                      # the whole encoder float...
          .set_module_name("0.1", bfx.int8())              # ...but its second block int8 (nearest ancestor wins)
          .set_module_name("0.1.fc2", bfx.weight_only("int4"))  # ...and one layer of it on its own rule
          .set_module_name_regex(r"0\.0\..*", bfx.int8())  # an ancestor's name ranks above patterns
          .set_object_type(nn.ReLU, bfx.QuantConfig(output=bfx.IntActivation(4, signed=False, dynamic=False,
                                                                               granularity="per_tensor"))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = bfx.prepare_qat(model, qc)
    # the container names count as used; only the pattern, outranked by the ancestor '0', applied nowhere
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "rule module_name_regex(" in messages[0] and "higher-priority rule" in messages[0]
    rows = {r["layer"]: (r["weight"], str(r["rule"])) for r in bfx.summary(pm).rows}
    assert rows["0.0.fc1"] == ("float", "module_name('0')") and rows["0.0.fc2"][0] == "float"
    assert rows["0.1.fc1"] == ("int8", "module_name('0.1')")
    assert rows["0.1.fc2"] == ("int4", "module_name('0.1.fc2')")
    assert rows["1"] == ("ternary", '"global"')
    # output rules: the float subtree keeps its ReLU float; the int8 block's rule has no output= and
    # does not stop the ReLU type rule there
    fq_names = {name for name, _ in pm.named_modules() if name.endswith("_output_fq")}
    assert fq_names == {"0_1_act_output_fq"}, fq_names


def test_root_name_is_not_an_ancestor():
    qc = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("", None)
    cfg, rule = qc.resolve("0.fc", nn.Linear)
    assert rule.kind == "global"
