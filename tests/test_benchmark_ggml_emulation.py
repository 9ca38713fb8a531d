"""benchmarks/ggml_emulation.py (check_export --emulate): its torch re-computation of llama.cpp's Q8_0 arithmetic
reproduces llama.cpp on a GGUF that bfx.export_gguf wrote, and its per-token mode reproduces the converted model,
so the gap between the two runtimes is the activation rounding it isolates."""
import pathlib
import sys

import numpy as np
import pytest
import torch

import bitlab_fx as bfx

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")  # CI installs it (.ci/run)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from ggml_emulation import LlamaEmulation, q8_0_blocks  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB = 96


def _int8_lm():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    weight_only = bfx.weight_only(bfx.IntWeight(8))
    qc = bfx.QConfigMapping().set_global(bfx.int8()).set_module_name_regex(r".*\.down_proj", weight_only)
    return bfx.convert(bfx.prepare_qat(model, qc).eval())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over positions of |a - b| / |b| (a rare activation code rounded the other way moves one position)."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).median().item()


def test_q8_0_blocks_round_each_block_of_32_on_its_own_scale():
    x = torch.cat([torch.full((32,), 0.01), torch.linspace(-100.0, 100.0, 32)])
    rounded = q8_0_blocks(x)
    assert torch.allclose(rounded[:32], x[:32], rtol=1e-3)  # a small block keeps its own precision
    assert (rounded[32:] - x[32:]).abs().max() <= 100 / 127 / 2 * 1.001


def test_emulation_reproduces_llama_cpp_and_per_token_mode_reproduces_bitlab(tmp_path):
    model = _int8_lm()
    path = str(tmp_path / "lm.gguf")
    assert set(bfx.export_gguf(model, path).values()) == {"Q8_0", "F16", "F32"}
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    llm = bfx.load_llama_cpp(path, n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids.tolist())
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = model(ids[None]).logits[0].float()
    emulated = LlamaEmulation(model).logits(ids)
    assert _relative(emulated, theirs) <= 1e-5 < 1e-3 <= _relative(ours, theirs)  # llama.cpp computes the emulation
    assert _relative(LlamaEmulation(model, activation="per_token").logits(ids), ours) <= 1e-5
