"""The C kernel for ``torch.ops.bitlab`` on CPU: loader and ``torch.library`` registration.

:func:`register` (called by ``bitlab_fx.ops``) registers the CPU kernels; nothing is compiled until
the first call, which builds the C files of this package (``bitlab_cpu.c`` and the others, listed in
``_build.FILES``) into one library in the user cache (see ``_build.py``) and loads it with ctypes.
Without a working C compiler the ops fall back to ``reference.py`` with one warning.

Environment:

- ``BITLAB_FX_DISABLE_CPU_KERNEL=1``: always use the reference implementation.
- ``BITLAB_FX_CACHE_DIR``: where the compiled library is cached.
- ``BITLAB_FX_CPU_ISA=scalar|avx2|vnni`` (x86) or ``scalar|neon|dotprod|i8mm`` (ARM64): cap the instruction set
  (debugging, tests).
- ``CC``: the C compiler.

The kernel runs ``torch.get_num_threads()`` OpenMP threads; it links the ``libgomp`` that torch has
already loaded, so torch's ops and this kernel share one thread pool instead of fighting over cores.
"""
from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from ...quant.packing import unpack_int4
from .. import _schema, reference
from . import torch_kernels

_ISA = {"scalar": 0, "avx2": 1, "vnni": 2, "neon": 3, "dotprod": 4, "i8mm": 5}  # bitlab_cpu.h ISA_*
_ACT = {"per_token": 0, "per_tensor": 1}
_ABI = 9
_lock = threading.Lock()
_lib = None  # ctypes library once loaded
_failed = False  # build or load failed (warned once)


def _load():
    global _lib, _failed, _linear_lib
    with _lock:
        if _lib is not None or _failed:
            return _lib
        try:
            from . import _build
            lib = ctypes.CDLL(str(_build.build()))
            if lib.bitlab_abi_version() != _ABI:
                raise _build.BuildError(f"library ABI {lib.bitlab_abi_version()} != {_ABI}")
            p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            lib.bitlab_linear.argtypes = [p, i64, i64, p, i32, i64, p, i32, i64, p, i32, f32, p, i32]
            lib.bitlab_linear_b.argtypes = [p, i64, i64, p, i32, i64, p, i32, i64, p, p, i32, i32, f32, p, i32]
            lib.bitlab_linear_q.argtypes = [p, p, i64, i64, p, i32, i64, p, i32, i64, p, p, i32, p, i32]
            lib.bitlab_linear_wo.argtypes = [p, i64, i64, p, i32, i64, p, i32, i64, p, p, i32]
            lib.bitlab_expand_wo.argtypes = [p, i32, i64, i64, p, i32, i64, p, i32]
            lib.bitlab_im2col_s8.argtypes = [p] + [i64] * 14 + [p, i32]
            lib.bitlab_im2col_s8.restype = None
            lib.bitlab_weight_codes_s8.argtypes = [p, i64, i64, p, i32, p, i32]
            lib.bitlab_weight_codes_s8.restype = None
            lib.bitlab_act_codes_s8.argtypes = [p, i64, i64, i32, p, p, i32]
            lib.bitlab_act_codes_s8.restype = None
            lib.bitlab_dequant_s8.argtypes = [p, i64, i64, p, i32, p, i32]
            lib.bitlab_dequant_s8.restype = None
            lib.bitlab_set_isa.argtypes = [i32]
            lib.bitlab_set_panel_min_m.argtypes = [i32]
            isa = os.environ.get("BITLAB_FX_CPU_ISA", "").strip().lower()
            lib.bitlab_set_isa(_ISA.get(isa, -1))
            _lib = lib
            if _linear_lib is not None:  # the C++ dispatcher kernels take over the linear ops (torch_kernels.py)
                _linear_lib = torch_kernels.install(lib, _linear_lib, _register_python_linear)
        except Exception as e:  # no compiler, compile error, unloadable library
            _failed = True
            warnings.warn(f"bitlab_fx: could not build the CPU kernel, using the slow reference implementation "
                          f"instead ({type(e).__name__}: {str(e).strip()[:500]}). Install a C compiler (cc/gcc) or "
                          f"set CC; set BITLAB_FX_DISABLE_CPU_KERNEL=1 to silence this.", RuntimeWarning, stacklevel=4)
        return _lib


def kernel_library():
    """The loaded ctypes library, or None (disabled by env, or it could not be built)."""
    if _kernel_disabled():
        return None
    return _lib if _lib is not None else _load()


def kernel_loaded() -> bool:
    """Whether the library is loaded and enabled, without building or loading it (traceable by torch.compile, which
    cannot enter the loader's lock)."""
    return _lib is not None and not _kernel_disabled()


# Read on every call (tests and users switch it at run time), so read cheaply: os.environ.get encodes the key
# and decodes the value each time (~1.5 us, a tenth of a small layer's kernel); its underlying dict does not.
_DISABLE = "BITLAB_FX_DISABLE_CPU_KERNEL"
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_DISABLE) if hasattr(os.environ, "encodekey") else _DISABLE


def _kernel_disabled() -> bool:
    value = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(_DISABLE)
    return bool(value) and value not in (b"0", "0")


def set_isa(name: Optional[str] = None) -> str:
    """Cap the kernel's instruction set (``"scalar"``; x86: ``"avx2"``, ``"vnni"``; ARM64: ``"neon"``,
    ``"dotprod"``, ``"i8mm"``; None or one this CPU lacks: the best); returns the one used."""
    lib = kernel_library()
    if lib is None:
        return "reference"
    got = lib.bitlab_set_isa(-1 if name is None else _ISA[name])
    return {v: k for k, v in _ISA.items()}[got]


def set_batched_min_m(m: int = 0) -> None:
    """Smallest batch (rows of the input) that takes the batched GEMM path; 0 restores the built-in choice.

    For tests and tuning: both paths give identical results."""
    lib = kernel_library()
    if lib is not None:
        lib.bitlab_set_panel_min_m(int(m))


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _f32(t: Tensor) -> Tensor:
    """``t`` as contiguous fp32 (no copy, and no dispatcher round trip, when it already is)."""
    return t if t.dtype is torch.float32 and t.is_contiguous() else t.float().contiguous()


def _scales(weight_scale: Tensor, n: int):
    ws = _f32(weight_scale)
    if ws.dim() == 2:
        return ws, 2, ws.shape[1]
    return ws, (1 if ws.shape[0] == n and n > 1 else 0), 1


_WO_EXACT_MAX_WEIGHTS = 1 << 20  # weight-only, M > 2: up to this many weights, bitwise the reference (see _linear)


def _supported(x: Tensor, weight_scale: Tensor, act: str, ternary: bool) -> bool:
    k = x.shape[-1]
    if k == 0:
        return False
    if act == "none":
        return True  # weight-only: bitlab_linear_wo (any scale layout)
    if weight_scale.dim() == 2 and ternary and (k // weight_scale.shape[1]) % 32:
        return False  # ternary groups must cover whole 32-runs of the packed layout
    return True


def _linear(lib, wfmt: int, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], act: str,
            static_multiplier: Optional[Tensor], bias_codes: Optional[Tensor] = None, act_bits: int = 8,
            bias_bits: int = 0) -> Tensor:
    # Hot path of every converted layer at inference (decode calls it ~200 times per token): each avoidable
    # tensor op here costs 0.5-2 us, as much as the kernel itself on a small layer, so nothing is reshaped,
    # converted or allocated that the kernel does not need. The kernel reads x as [M, K] rows in memory.
    k = x.shape[-1]
    n = weight.shape[0]
    xf = _f32(x)
    m = xf.numel() // k if k else 0
    if m == 0:
        return x.new_empty(x.shape[:-1] + (n,))
    if act_bits != 8:  # codes of fewer bits: quantized here (as the conv path does), the kernel takes them
        codes, s = _act_codes(xf.reshape(m, k), act, static_multiplier, 1, act_bits)
        out = _from_codes(lib, wfmt, codes, s.reshape(-1).expand(m), weight, weight_scale, bias, bias_codes, bias_bits)
        out = out.view(*x.shape[:-1], n) if x.dim() != 2 else out
        return out if x.dtype is torch.float32 else out.to(x.dtype)
    ws, kind, groups = _scales(weight_scale, n)
    w = weight if weight.is_contiguous() else weight.contiguous()
    if act == "none" and m > 2 and (n * k <= _WO_EXACT_MAX_WEIGHTS or m > 32):
        return _weight_only_expanded(lib, wfmt, x, xf.reshape(m, k), w, ws, kind, groups, bias, n, k)
    out = torch.empty(m, n, dtype=torch.float32)  # 2-D: ~1 us cheaper to allocate than the N-D shape
    b = None if bias is None else _f32(bias)  # kept alive until the kernel returns
    bp = None if b is None else b.data_ptr()
    threads = torch.get_num_threads()
    if act == "none":  # weight-only: fused (M <= 2) or 4 expanded rows at a time; float sums in its own order
        rc = lib.bitlab_linear_wo(xf.data_ptr(), m, k, w.data_ptr(), wfmt, n, ws.data_ptr(), kind, groups, bp,
                                  out.data_ptr(), threads)
    else:
        if static_multiplier is not None:
            code, static = 2, float(static_multiplier.reshape(-1)[0])
        else:
            code, static = _ACT[act], 0.0
        if bias_codes is None and not bias_bits:
            rc = lib.bitlab_linear(xf.data_ptr(), m, k, w.data_ptr(), wfmt, n, ws.data_ptr(), kind, groups, bp, code,
                                   static, out.data_ptr(), threads)
        else:  # an IntBias: int32 codes (contiguous int32, checked by the op), or the float bias quantized per token
            bq = None if bias_codes is None else bias_codes.contiguous()
            rc = lib.bitlab_linear_b(xf.data_ptr(), m, k, w.data_ptr(), wfmt, n, ws.data_ptr(), kind, groups, bp,
                                     _ptr(bq), bias_bits, code, static, out.data_ptr(), threads)
    if rc != 0:
        what = "a weight-only" if act == "none" else "a"
        raise MemoryError(f"bitlab CPU kernel: out of memory for {what} [{m}, {k}] x [{n}, {k}] linear")
    if x.dim() != 2:
        out = out.view(*x.shape[:-1], n)
    return out if x.dtype is torch.float32 else out.to(x.dtype)


def _from_codes(lib, wfmt: int, codes: Tensor, s_rows: Tensor, weight: Tensor, weight_scale: Tensor,
                bias: Optional[Tensor], bias_codes: Optional[Tensor], bias_bits: int) -> Tensor:
    """``[M, N]`` fp32 from activation codes ``[M, K]`` (fp32 whole numbers or int8) and their multipliers ``s_rows
    [M]`` (``bitlab_linear_q``: the conv path, and linear layers with codes of fewer than 8 bits)."""
    m, k = codes.shape
    n = weight.shape[0]
    xq = codes.to(torch.int8).contiguous()
    s = _f32(s_rows)
    ws, kind, groups = _scales(weight_scale, n)
    w = weight.reshape(n, -1).contiguous()
    b = None if bias is None else bias.float().contiguous()
    bq = None if bias_codes is None else bias_codes.contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    if m and lib.bitlab_linear_q(xq.data_ptr(), s.data_ptr(), m, k, w.data_ptr(), wfmt, n, ws.data_ptr(), kind,
                                 groups, _ptr(b), _ptr(bq), bias_bits, out.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError(f"bitlab CPU kernel: out of memory for a [{m}, {k}] x [{n}, {k}] product of codes")
    return out


def _weight_only_expanded(lib, wfmt: int, x: Tensor, x2: Tensor, w: Tensor, ws: Tensor, kind: int, groups: int,
                          bias: Optional[Tensor], n: int, k: int) -> Tensor:
    """Weight-only, batched, layer up to 1M weights: expand w * ws to fp32 in C (transient), then the
    reference's own matmul, so the result is reference.py's bitwise (and the converted model's equals the
    prepared one's, which matters where a low-bit quantizer follows). Larger layers at M <= 32 take the
    kernel instead: a fresh fp32 copy of a big weight costs more in page faults alone (~18 ms for 64 MiB)
    than the matmul; above 32 tokens torch's matmul amortizes it and the kernel's row-by-row dots lose."""
    wf = torch.empty(n, k, dtype=torch.float32)
    if lib.bitlab_expand_wo(w.data_ptr(), wfmt, n, k, ws.data_ptr(), kind, groups, wf.data_ptr(),
                            torch.get_num_threads()) != 0:
        raise MemoryError(f"bitlab CPU kernel: out of memory expanding a [{n}, {k}] weight")
    y = x2 @ wf.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def ternary_linear(x, packed_weight, weight_scale, bias=None, act="per_token", act_scale=None, in_features=-1,
                   act_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = _schema.resolve_multiplier("ternary_linear", act_scale, act_multiplier)
    _schema.check_linear("ternary_linear", x, packed_weight, weight_scale, bias, act, static_multiplier, True, in_features,
                         bias_codes, act_bits, bias_bits)
    lib = kernel_library()
    if lib is None or not _supported(x, weight_scale, act, ternary=True):
        return reference.ternary_linear(x, packed_weight, weight_scale, bias, act, static_multiplier,
                                        bias_codes=bias_codes, act_bits=act_bits, bias_bits=bias_bits)
    return _linear(lib, 0, x, packed_weight, weight_scale, bias, act, static_multiplier, bias_codes, act_bits, bias_bits)


def int8_linear(x, weight, weight_scale, bias=None, act="per_token", act_scale=None, act_multiplier=None,
                bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = _schema.resolve_multiplier("int8_linear", act_scale, act_multiplier)
    _schema.check_linear("int8_linear", x, weight, weight_scale, bias, act, static_multiplier, packed=False,
                         bias_codes=bias_codes, act_bits=act_bits, bias_bits=bias_bits)
    lib = kernel_library()
    if lib is None or not _supported(x, weight_scale, act, ternary=False):
        return reference.int8_linear(x, weight, weight_scale, bias, act, static_multiplier, bias_codes=bias_codes,
                                     act_bits=act_bits, bias_bits=bias_bits)
    return _linear(lib, 1, x, weight, weight_scale, bias, act, static_multiplier, bias_codes, act_bits, bias_bits)


def _act_codes(xf: Tensor, act: str, static_multiplier: Optional[Tensor], token_dims: int, act_bits: int = 8):
    """The activation codes (as fp32 integers) of an fp32 input and the multiplier ``s`` (``[M, 1...]`` per token,
    else ``[1...]``): ``reference.quantize_int8(x, reference.act_multiplier(x, ...), act_bits)``, with rounding and
    clamping in place (fewer fp32 temporaries)."""
    s = reference.act_multiplier(xf, act, static_multiplier, token_dims, act_bits)
    qmax = reference.act_qmax(act_bits)
    q = torch.mul(xf, s)
    q.round_()
    q.clamp_(-qmax - 1, qmax)
    return q, s


def _im2col_int8(lib, codes: Tensor, kh: int, kw: int, stride, padding, dilation, ho: int, wo: int) -> Tensor:
    """``[B * Ho * Wo, C * kh * kw]`` int8 patches (``F.unfold``'s order, transposed), gathered in C from the int8
    codes (``bitlab_im2col_s8``): 4x fewer bytes than ``F.unfold`` on fp32 and no transpose afterwards."""
    codes = codes.to(torch.int8).contiguous()
    b, c, h, w = codes.shape
    out = torch.empty(b * ho * wo, c * kh * kw, dtype=torch.int8)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    lib.bitlab_im2col_s8(codes.data_ptr(), b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, out.data_ptr(),
                         torch.get_num_threads())
    return out


def _conv_im2col(lib, wfmt: int, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                 weight_shape, stride, padding, dilation, act: str, static_multiplier: Optional[Tensor],
                 bias_codes: Optional[Tensor] = None, act_bits: int = 8, bias_bits: int = 0) -> Tensor:
    """groups=1 conv2d: quantize x exactly like the reference, gather the int8 patches, run the linear kernel
    (a sample's rows share its multiplier, so per-token bias codes are per sample, as in the reference)."""
    cout, cin, kh, kw = weight_shape
    codes, s = _act_codes(_f32(x), act, static_multiplier, 3, act_bits)
    batch = x.shape[0]
    ho, wo = _schema.conv2d_out_shape("conv2d", x, list(weight_shape), stride, padding, dilation, 1)[2:]
    cols = _im2col_int8(lib, codes, kh, kw, stride, padding, dilation, ho, wo)
    length = ho * wo
    s_rows = s.reshape(-1).expand(batch).repeat_interleave(length).contiguous()
    out = _from_codes(lib, wfmt, cols, s_rows, weight, weight_scale, bias, bias_codes, bias_bits)
    y = out.reshape(batch, length, cout).transpose(1, 2).reshape(batch, cout, ho, wo)
    return y.to(x.dtype).contiguous()


def ternary_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups,
                   act="per_token", act_scale=None, act_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = _schema.resolve_multiplier("ternary_conv2d", act_scale, act_multiplier)
    _schema.check_conv2d("ternary_conv2d", x, packed_weight, weight_scale, bias, weight_shape, stride, padding,
                         dilation, groups, act, static_multiplier, packed=True, bias_codes=bias_codes,
                         act_bits=act_bits, bias_bits=bias_bits)
    lib = kernel_library()
    if lib is None or groups != 1 or act == "none":
        return reference.ternary_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation,
                                        groups, act, static_multiplier, bias_codes, act_bits, bias_bits)
    return _conv_im2col(lib, 0, x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, act,
                        static_multiplier, bias_codes, act_bits, bias_bits)


def int8_conv2d(x, weight, weight_scale, bias, stride, padding, dilation, groups, act="per_token", act_scale=None,
                act_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = _schema.resolve_multiplier("int8_conv2d", act_scale, act_multiplier)
    _schema.check_conv2d("int8_conv2d", x, weight, weight_scale, bias, list(weight.shape), stride, padding, dilation,
                         groups, act, static_multiplier, packed=False, bias_codes=bias_codes, act_bits=act_bits,
                         bias_bits=bias_bits)
    lib = kernel_library()
    if lib is None or groups != 1 or act == "none":
        return reference.int8_conv2d(x, weight, weight_scale, bias, stride, padding, dilation, groups, act,
                                     static_multiplier, bias_codes, act_bits, bias_bits)
    return _conv_im2col(lib, 1, x, weight, weight_scale, bias, list(weight.shape), stride, padding, dilation, act,
                        static_multiplier, bias_codes, act_bits, bias_bits)


def int4_linear(x, packed_weight, weight_scale, bias=None, act="per_token", act_scale=None, in_features=-1,
                act_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    """2..4-bit weights straight from their nibbles (two per byte): the decode loop at M=1, the batched GEMM
    otherwise; CPUs without AVX2 (and scale groups that do not cover whole 64-k chunks) unpack to int8 in C."""
    static_multiplier = _schema.resolve_multiplier("int4_linear", act_scale, act_multiplier)
    _schema.check_int4_linear(x, packed_weight, weight_scale, bias, act, static_multiplier, in_features, bias_codes,
                              act_bits, bias_bits)
    lib = kernel_library()
    if lib is None or not _supported(x, weight_scale, act, ternary=False):
        return reference.int4_linear(x, packed_weight, weight_scale, bias, act, static_multiplier, in_features,
                                     bias_codes, act_bits, bias_bits)
    return _linear(lib, 2, x, packed_weight, weight_scale, bias, act, static_multiplier, bias_codes, act_bits, bias_bits)


def int4_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups,
                act="per_token", act_scale=None, act_multiplier=None, bias_codes=None, act_bits=8, bias_bits=0):
    static_multiplier = _schema.resolve_multiplier("int4_conv2d", act_scale, act_multiplier)
    _schema.check_int4_conv2d(x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, groups,
                              act, static_multiplier, bias_codes, act_bits, bias_bits)
    lib = kernel_library()
    if lib is None or groups != 1 or act == "none":
        w8 = reference.unpack_conv_weight(unpack_int4, packed_weight, weight_shape)
        return int8_conv2d(x, w8, weight_scale, bias, stride, padding, dilation, groups, act, static_multiplier,
                           bias_codes=bias_codes, act_bits=act_bits, bias_bits=bias_bits)
    return _conv_im2col(lib, 2, x, packed_weight, weight_scale, bias, weight_shape, stride, padding, dilation, act,
                        static_multiplier, bias_codes, act_bits, bias_bits)


_registered = False


def register() -> None:
    """Register the CPU kernels for the linear and conv ops (idempotent; compiles nothing)."""
    global _registered, _impl_lib, _linear_lib, _fallback_lib
    if _registered:
        return
    # Straight onto the dispatcher's CPU key (not ``torch.library.register_kernel``, which wraps every call
    # in Python checks: ~3 us, as much as a small layer's whole kernel). The kernels return fresh tensors.
    _impl_lib = torch.library.Library("bitlab", "IMPL")
    for name, fn in (("ternary_conv2d", ternary_conv2d), ("int8_conv2d", int8_conv2d), ("int4_conv2d", int4_conv2d)):
        _impl_lib.impl(name, fn, "CPU")
    _linear_lib = _register_python_linear()  # until the C++ kernels replace them (torch_kernels.py)
    _fallback_lib = torch_kernels.define_python_fallbacks(_PYTHON_LINEAR)
    _registered = True


def _register_python_linear() -> torch.library.Library:
    lib = torch.library.Library("bitlab", "IMPL")
    for name, fn in _PYTHON_LINEAR.items():
        lib.impl(name, fn, "CPU")
    return lib


_PYTHON_LINEAR = {"ternary_linear": ternary_linear, "int8_linear": int8_linear, "int4_linear": int4_linear}
_impl_lib = _linear_lib = _fallback_lib = None
