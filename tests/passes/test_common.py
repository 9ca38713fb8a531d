"""What the passes share: the per-model Record (typed, and read from models pickled with the old dict)."""
import torch
from torch import nn

import bitlab_fx as bfx
from bitlab_fx.passes._common import RECORD_KEY, ROOT_ATTR, Record, bitlab_meta, stage_of, unique_name


def test_prepared_and_converted_graphs_carry_a_record():
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(4, 4)), bfx.ternary())
    record = bitlab_meta(pm)
    assert isinstance(record, Record) and record.stage == "prepared" and record.frontend == "fx"
    assert record.qconfig is not None and record.parts is None
    assert stage_of(bfx.convert(pm)) == "converted" and stage_of(pm) == "prepared"
    assert stage_of(nn.Linear(2, 2)) is None


def test_old_dict_records_are_read_as_records():
    pm = bfx.prepare_qat(nn.Sequential(nn.Linear(4, 4)), bfx.ternary())
    pm.meta[RECORD_KEY] = {"stage": "prepared", "qconfig": None, "frontend": "fx", "unknown_key": 1}
    assert stage_of(pm) == "prepared" and isinstance(pm.meta[RECORD_KEY], Record)
    model = nn.Sequential(nn.Linear(2, 2))
    model.__dict__[ROOT_ATTR] = {"stage": "converted", "parts": {"0": "layer"}}
    assert bitlab_meta(model).parts == {"0": "layer"} and stage_of(model) == "converted"


def test_unique_name_never_reuses_an_attribute():
    m = nn.Module()
    m.fc_weight_fq = nn.Identity()
    m.fc_weight_fq_1 = torch.nn.Identity()
    assert unique_name(m, "fc.weight_fq") == "fc_weight_fq_2" and unique_name(m, "") == "root"
