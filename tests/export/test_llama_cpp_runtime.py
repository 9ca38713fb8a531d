"""bfx.load_llama_cpp: llama-cpp-python opened so that it runs on every x86 CPU (AMX-INT8 ones included)."""
import sys

import numpy as np
import pytest
import torch

import bitlab_fx as bfx
from bitlab_fx.export import llama_cpp_runtime as R

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")  # CI installs it (.ci/run)
import llama_cpp.llama_cpp as llama_module  # noqa: E402


def test_extra_buffers_are_turned_off_only_on_amx_cpus_unless_told(monkeypatch):
    monkeypatch.delenv("BITLAB_FX_LLAMA_CPP_EXTRA_BUFTS", raising=False)
    assert R.extra_buffers_crash({"avx2", "avx512_vnni", "amx_int8"})
    assert not R.extra_buffers_crash({"avx2", "avx512_vnni", "avx_vnni"})
    monkeypatch.setenv("BITLAB_FX_LLAMA_CPP_EXTRA_BUFTS", "1")
    assert not R.extra_buffers_crash({"amx_int8"})


def _tiny_gguf(tmp_path) -> str:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32)
    model = bfx.convert(bfx.prepare_qat(transformers.LlamaForCausalLM(cfg).eval(), bfx.ternary()).eval())
    path = str(tmp_path / "lm.gguf")
    bfx.export_gguf(model, path)  # the head is Q8_0: the weights llama.cpp moves into AMX buffers
    return path


@pytest.mark.parametrize("crashes", [False, True])
def test_the_model_opens_with_extra_buffers_off_where_they_crash(tmp_path, monkeypatch, crashes):
    this_cpu_crashes = R.extra_buffers_crash()
    monkeypatch.setattr(R, "extra_buffers_crash", lambda: crashes)
    default = llama_module.llama_model_default_params
    llm = bfx.load_llama_cpp(_tiny_gguf(tmp_path), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    assert llm.model_params.use_extra_bufts is (not crashes)
    assert llama_module.llama_model_default_params is default  # the override ends with the load
    assert default().use_extra_bufts
    if this_cpu_crashes and not crashes:
        return  # opened as llama_cpp.Llama opens it: on this AMX CPU its AMX matmul would crash the process
    llm.eval([1, 2, 3])
    assert np.isfinite(np.array(llm.scores[:3])).all()


def test_without_llama_cpp_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(bfx.ExportError, match="pip install llama-cpp-python"):
        bfx.load_llama_cpp("lm.gguf")
