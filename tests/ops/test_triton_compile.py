"""The Triton kernels compiled for real NVIDIA GPUs (sm_80, sm_90) without one: Triton's compiler, ptxas and
cuobjdump run on CPU-only machines, so CI checks what the interpreter cannot: every default config compiles,
spills no registers, fits shared memory, and uses the intended instructions (dp4a in the decode GEMV, int8
tensor-core MMA for larger batches)."""
import importlib.util

import numpy as np
import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'bitlab-fx[cuda]')")

SMEM = {80: 163 * 1024, 90: 227 * 1024}  # usable shared memory per block


@pytest.fixture(scope="module")
def report():
    from bitlab_fx.ops.cuda import compile_report

    if compile_report.cuobjdump() is None:
        pytest.skip("the triton wheel of this platform ships no cuobjdump")
    return compile_report


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("m", [1, 8, 16, 256])
def test_default_configs_compile_without_spills_and_use_dp4a_or_int8_mma(report, arch, m):
    from bitlab_fx.ops.cuda import kernels as K

    cfg = K.choose_config(m, 4096, 4096)
    r = report.compile_linear(cfg, m, 4096, 4096, arch=arch)
    assert r.local_bytes == 0, f"register spills: {r}"
    assert r.shared_bytes <= SMEM[arch]
    if cfg.use_dot:
        assert r.mma and all(".S8.S8" in i for i in r.mma), r.mma  # int8 x int8 on tensor cores
        assert ("IGMMA" if arch == 90 else "IMMA") in r.mma[0]
    else:
        assert r.loop_opcodes["IDP"] > 0, r.loop_opcodes.most_common(8)  # dp4a in the K loop
        assert any(ld.endswith((".64", ".128")) for ld in r.loads), r.loads  # vector loads of packed weights


def test_integer_bias_codes_compile_in_both_paths(report):
    from bitlab_fx.ops.cuda import kernels as K

    for m in (1, 64):  # the dp4a GEMV and the int8 tensor-core path, each ending in the epilogue that adds the codes
        r = report.compile_linear(K.choose_config(m, 2048, 2048), m, 2048, 2048, bias_codes=True)
        assert r.local_bytes == 0 and r.shared_bytes <= SMEM[90]


def test_per_token_bias_codes_compile_in_both_paths(report):
    from bitlab_fx.ops.cuda import kernels as K

    for m in (1, 64):  # the epilogue quantizes the float bias per token (libdevice rint) and adds the codes
        r = report.compile_linear(K.choose_config(m, 2048, 2048), m, 2048, 2048, bias_bits=8)
        assert r.local_bytes == 0 and r.shared_bytes <= SMEM[90]


@pytest.mark.parametrize("case", ["int8-gemv", "group-gemv", "act-none-dot", "act-none-gemv", "group-dot"])
def test_other_paths_compile_for_sm90(report, case):
    from bitlab_fx.ops.cuda import kernels as K

    m, packed, ws_mode, act_float = {"int8-gemv": (1, False, K.WS_CHANNEL, False),
                                     "group-gemv": (4, True, K.WS_GROUP, False),
                                     "act-none-dot": (32, True, K.WS_TENSOR, True),
                                     "act-none-gemv": (2, True, K.WS_CHANNEL, True),
                                     "group-dot": (64, True, K.WS_GROUP, False)}[case]
    cfg = K.choose_config(m, 2048, 2048, 64 if ws_mode == K.WS_GROUP else 0)
    r = report.compile_linear(cfg, m, 2048, 2048, packed=packed, ws_mode=ws_mode, act_float=act_float)
    assert r.local_bytes == 0 and r.shared_bytes <= SMEM[90]
    if case.endswith("gemv") and not act_float:
        assert r.loop_opcodes["IDP"] > 0


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_activation_quantization_kernel_compiles(report, mode):
    r = report.compile_quant_act(8192, mode=mode)
    assert r.local_bytes == 0


def test_swar_unpack_and_dp4a_arithmetic():
    """The byte tricks inside the inline assembly, on 32-bit words in numpy: ``(c | 0x80) - 1 ^ 0x80`` per
    byte is ``c - 1`` with no borrow between bytes, and dp4a of codes minus dp4a of ones is the ternary dot."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(4096, 4, 4), dtype=np.uint32)  # [word, byte, run]
    packed = sum(codes[:, b, r] << (8 * b + 2 * r) for b in range(4) for r in range(4)).astype(np.uint32)
    xs = rng.integers(-128, 128, size=(4096, 4), dtype=np.int64)
    for r in range(4):
        c = (packed >> (2 * r)) & 0x03030303
        w = (((c | 0x80808080) - 0x01010101) ^ 0x80808080).astype(np.uint32)
        w_bytes = w.view(np.uint8).reshape(-1, 4).view(np.int8).astype(np.int64)
        c_bytes = c.view(np.uint8).reshape(-1, 4).astype(np.int64)
        np.testing.assert_array_equal(c_bytes, codes[:, :, r])
        np.testing.assert_array_equal(w_bytes, c_bytes - 1)
        np.testing.assert_array_equal((c_bytes * xs).sum(1) - xs.sum(1), (w_bytes * xs).sum(1))
