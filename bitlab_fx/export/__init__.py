"""Deployment formats of a converted model: GGUF for llama.cpp, ONNX for onnxruntime (docs/deploy.md).

Both read each converted layer's integer codes and steps (:mod:`.weights`) and re-block them in the
format's own layout; nothing is re-quantized. The format packages (``gguf``, ``onnx``) load on first call
(the ``export`` extra).
"""
from .gguf import export_gguf
from .llama_cpp_runtime import load_llama_cpp
from .onnx import export_onnx
from .onnx_decoder import OnnxDecoder, export_onnx_decoder

__all__ = ["export_gguf", "load_llama_cpp", "export_onnx", "export_onnx_decoder", "OnnxDecoder"]
