"""bitlab_fx: ternary (1.58-bit) and low-bit quantization of PyTorch models by graph rewriting.

>>> import torch, bitlab_fx as bfx
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
>>> pm = bfx.prepare_qat(model, bfx.ternary())          # fx graph with fake-quant nodes
>>> cm = bfx.convert(pm.eval())                         # packed 2-bit weights + torch.ops.bitlab.*
>>> bfx.summary(cm).totals["quantized"]
2
"""
from .api import convert, disable_fake_quant, disable_observer, enable_fake_quant, enable_observer, prepare_qat
from .decode import compile_for_decode, greedy_decode
from .lean import lean_fallback_reason
from .config import IntActivation, IntBias, IntWeight, PerGroup, QuantConfig, TernaryWeight, int8, ternary, weight_only
from .errors import BitlabError, CaptureError, ConfigError, ConvertError, ExportError, KernelError
from .export import export_gguf, export_onnx, export_onnx_decoder, load_llama_cpp
from .mapping import QConfigMapping
from .quant.fake_quant import calibrate
from .nn.quantized import QuantizedConv1d, QuantizedConv2d, QuantizedLinear
from .nn.embedding import QuantizedEmbedding
from . import recipes
from .recipes import QuantWarmup
from .bitlab import BitQuantConfig
from .serialization import load_quantized, save_quantized
from .summary import Summary, summary
from .training_compile import compile

__version__ = "0.1.0"

__all__ = [
    "prepare_qat", "convert", "summary", "Summary", "save_quantized", "load_quantized",
    "enable_fake_quant", "disable_fake_quant", "enable_observer", "disable_observer", "calibrate",
    "QConfigMapping", "QuantConfig", "TernaryWeight", "IntWeight", "IntActivation", "IntBias", "PerGroup",
    "ternary", "int8", "weight_only", "QuantWarmup", "BitQuantConfig", "compile_for_decode", "greedy_decode",
    "lean_fallback_reason", "recipes", "compile",
    "QuantizedLinear", "QuantizedConv1d", "QuantizedConv2d", "QuantizedEmbedding",
    "BitlabError", "ConfigError", "CaptureError", "ConvertError", "KernelError", "ExportError",
    "export_gguf", "export_onnx", "export_onnx_decoder", "load_llama_cpp",
]
