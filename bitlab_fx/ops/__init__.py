"""``torch.ops.bitlab``: custom ops with a reference implementation and per-device kernels.

Importing this package defines the ops; device kernels register themselves here and compile lazily
on first use (``import bitlab_fx`` compiles nothing).
"""
from . import _schema  # noqa: F401  (defines torch.ops.bitlab.*)
from . import _grouped  # noqa: F401  (the grouped-expert ops bitlab.<format>_grouped_linear)
from ._schema import int8_conv2d, int8_linear, ternary_conv2d, ternary_linear
from .cpu import register as _register_cpu_kernels  # C kernel, compiled lazily on first call
_register_cpu_kernels()
from .cpu.grouped import register as _register_grouped_cpu_kernels
_register_grouped_cpu_kernels()
from .cuda import register as _register_cuda_kernels  # Triton, imported on the first CUDA call
_register_cuda_kernels()

__all__ = ["ternary_linear", "int8_linear", "ternary_conv2d", "int8_conv2d"]
