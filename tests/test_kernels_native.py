"""The native CPU backend dfqvit._C: packing, GEMM, attention and the whole engine, bit for bit equal to the
PyTorch reference (skipped when the extension is not built)."""
from __future__ import annotations

import importlib

import pytest
import torch

from dfqvit.kernels import reference


def _native():
    try:
        importlib.import_module("dfqvit._C")
    except ImportError:
        pytest.skip("dfqvit._C not built (DFQVIT_BUILD_EXT=1 pip install -e . builds it)")
    return torch.ops.dfqvit


@pytest.mark.parametrize("bits,group_k", [(4, 16), (4, 64), (3, 32), (3, 128)])
@pytest.mark.parametrize("k", [1, 40, 100, 129])
def test_native_packing_matches_reference(bits, group_k, k):
    ops = _native()
    codes = torch.randint(0, 2 ** bits, (17, k), generator=torch.Generator().manual_seed(k)).to(torch.uint8)
    packed = ops.native_pack_weight(codes, bits, group_k)
    assert torch.equal(packed, reference.pack_weight_reference(codes, bits, group_k))
    assert torch.equal(ops.native_unpack_weight(packed, bits, k, group_k), codes)


def test_native_packing_rejects_bad_arguments():
    ops = _native()
    with pytest.raises(RuntimeError, match="storage_bits=5"):
        ops.native_pack_weight(torch.zeros(2, 16, dtype=torch.uint8), 5, 16)


# --- GEMM -----------------------------------------------------------------------------------------------
# Bit-exact: the native kernels run the reference's integer sums and fp32 epilogue in the same order (GELU via
# portable_math), so every comparison below is torch.equal, for every ISA this CPU runs.

GEN = torch.Generator().manual_seed(5)
GEMM_SHAPES = [(1, 3, 5), (7, 19, 17), (33, 48, 100), (66, 37, 129), (130, 16, 64), (5, 100, 3), (96, 20, 128),
               (9, 21, 18)]
# AMX reads the activations in place for K 64 and 128: 130 rows end inside a 16-row group (last tile from a padded
# copy), 96 rows do not.


ISAS = ["scalar", "avx2", "avx512_vnni", "amx_int8"]  # each rung runs everything below it


def _isas():
    from dfqvit.kernels import native
    if not native.available():
        return ["scalar"]
    ladder = ISAS
    return ladder[: ladder.index(native.detected_isa()) + 1]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with the native kernels forced to one ISA (skipped where the CPU lacks it)."""
    _native()
    from dfqvit.kernels import native
    if request.param not in _isas():
        pytest.skip(f"this CPU runs up to {native.detected_isa()}, not {request.param}")
    previous = native.set_isa(request.param)
    yield request.param
    native.set_isa(previous)


def _weight(bits, n, k):
    from kernel_utils import random_weight
    from dfqvit.kernels import pack_weight
    codes, scale, zero = random_weight(bits, n, k, GEN)
    return pack_weight(codes, scale, zero, bits)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_native_qgemm_is_bit_exact(isa, bits, m, n, k):
    from dfqvit.kernels import native
    w = _weight(bits, n, k)
    a = torch.randint(-128, 128, (m, k), generator=GEN).to(torch.int8)
    bias, residual = torch.randn(n, generator=GEN), torch.randn(m, n, generator=GEN)
    panels = native.prepack(w.data, w.storage_bits, k, w.group_k)
    for gelu, res, requant, out_dtype in [(False, None, None, torch.float32), (True, residual, None, torch.float32),
                                          (True, None, 0.03, torch.int8), (False, residual, 0.05, torch.int8),
                                          (True, residual.half(), None, torch.float16),
                                          (False, None, None, torch.bfloat16)]:
        args = (a, 0.02, -5, w.data, w.w_scale, w.w_zero, w.w_col_sums, bias, res, w.storage_bits, k, w.group_k,
                gelu, requant, 3, -128, 127, out_dtype)
        expected = reference.qgemm_reference(*args)
        assert torch.equal(torch.ops.dfqvit.native_qgemm(*args), expected)
        got = native.qgemm_prepacked(a, 0.02, -5, panels, n, w.w_scale, w.w_zero, w.w_col_sums, bias, res,
                                     w.storage_bits, k, gelu, requant, 3, -128, 127, out_dtype)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,n,k", [(1, 3, 5), (66, 37, 129), (101, 48, 64), (200, 192, 40)])
def test_native_qgemm_norm_is_the_gemm_then_layernorm_quant(isa, bits, m, n, k):
    """The fused residual GEMM + LayerNorm+quantize equals the two ops bit for bit: every row tile (48 rows, a
    short last one) is normalized after its last panel and residual add."""
    from dfqvit.kernels import native
    w = _weight(bits, n, k)
    a = torch.randint(-128, 128, (m, k), generator=GEN).to(torch.int8)
    bias, residual = torch.randn(n, generator=GEN), torch.randn(m, n, generator=GEN)
    nw, nb = torch.randn(n, generator=GEN), torch.randn(n, generator=GEN)
    panels = native.prepack(w.data, w.storage_bits, k, w.group_k)
    for res, b in ((residual, bias), (None, None)):
        gemm = (a, 0.02, -5, panels, n, w.w_scale, w.w_zero, w.w_col_sums, b, res, w.storage_bits, k)
        y, codes = native.qgemm_prepacked_norm(*gemm, nw, nb, 1e-6, 0.03, 2, -128, 127)
        expected = native.qgemm_prepacked(*gemm, False, None, 0, 0, 0, torch.float32)
        assert torch.equal(y, expected)
        assert torch.equal(codes, reference.layernorm_quant_reference(expected, nw, nb, 1e-6, 0.03, 2, -128, 127))
    with pytest.raises(RuntimeError, match="LayerNorm weight and bias"):
        native.qgemm_prepacked_norm(*gemm, nw[:-1], nb, 1e-6, 0.03, 2, -128, 127)


@pytest.mark.parametrize("n", [1360, 1400])
def test_native_qgemm_residual_with_and_without_the_staging_block(isa, n):
    """fp32 + residual: tiles staged per thread (N 1360: 48 x N floats fit the 256 KB block) or written in place
    and added to afterwards (N 1400), both the reference's bits."""
    from dfqvit.kernels import native
    m, k = 60, 24
    w = _weight(4, n, k)
    panels = native.prepack(w.data, w.storage_bits, k, w.group_k)
    a = torch.randint(-128, 128, (m, k), generator=GEN).to(torch.int8)
    bias, residual = torch.randn(n, generator=GEN), torch.randn(m, n, generator=GEN)
    args = (a, 0.02, 1, w.data, w.w_scale, w.w_zero, w.w_col_sums, bias, residual, w.storage_bits, k, w.group_k,
            False, None, 0, 0, 0, torch.float32)
    got = native.qgemm_prepacked(a, 0.02, 1, panels, n, w.w_scale, w.w_zero, w.w_col_sums, bias, residual,
                                 w.storage_bits, k, False, None, 0, 0, 0, torch.float32)
    assert torch.equal(got, reference.qgemm_reference(*args))


def test_native_qgemm_weights_unpacked_per_tile_beyond_the_once_per_call_size(isa):
    """N 400 x K 2800: 1.1 MB of unpacked AVX2 planes, above the once-per-call limit (1 MB), so each row tile
    unpacks its panels (M 100: three tiles); also the short-M form (one tile)."""
    from dfqvit.kernels import native
    n, k = 400, 2800
    w = _weight(4, n, k)
    panels = native.prepack(w.data, w.storage_bits, k, w.group_k)
    for m in (100, 9):
        a = torch.randint(-128, 128, (m, k), generator=GEN).to(torch.int8)
        bias = torch.randn(n, generator=GEN)
        args = (a, 0.02, -5, w.data, w.w_scale, w.w_zero, w.w_col_sums, bias, None, w.storage_bits, k, w.group_k,
                True, 0.05, 3, -128, 127, torch.int8)
        got = native.qgemm_prepacked(a, 0.02, -5, panels, n, w.w_scale, w.w_zero, w.w_col_sums, bias, None,
                                     w.storage_bits, k, True, 0.05, 3, -128, 127, torch.int8)
        assert torch.equal(got, reference.qgemm_reference(*args))


@pytest.mark.parametrize("bits,code,zero", [(4, 15, 0), (4, 0, 15), (3, 7, 0), (3, 0, 7), (4, 15, 20)])
def test_native_qgemm_extreme_codes_and_long_k(isa, bits, code, zero):
    """Every activation at -128 or 127 against one code and zero point everywhere, K = 3072: the s16 sums' worst
    cases (AVX2 sums eight quads of code x activation in s16: 15 x -128 x 16 = -30720), a zero point at either end
    of the codes' range and one outside it (20)."""
    from dfqvit.kernels import native, pack_weight
    n, k = 24, 3072
    w = pack_weight(torch.full((n, k), code, dtype=torch.uint8), torch.ones(n),
                    torch.full((n,), zero, dtype=torch.int32), bits)
    panels = native.prepack(w.data, bits, k, w.group_k)
    for fill in (-128, 127):
        a = torch.full((5, k), fill, dtype=torch.int8)
        args = (a, 1.0, 0, w.data, w.w_scale, w.w_zero, w.w_col_sums, None, None, w.storage_bits, k, w.group_k,
                False, None, 0, -128, 127, torch.float32)
        expected = reference.qgemm_reference(*args)
        assert float(expected[0, 0]) == (fill * (code - zero) * k)
        assert torch.equal(native.qgemm_prepacked(a, 1.0, 0, panels, n, w.w_scale, w.w_zero, w.w_col_sums, None,
                                                  None, bits, k, False, None, 0, -128, 127, torch.float32),
                           expected)


def test_native_kernels_are_the_cpu_implementation_of_the_ops():
    _native()
    w = _weight(4, 20, 50)
    a = torch.randint(-128, 128, (9, 50), generator=GEN).to(torch.int8)
    args = (a, 0.02, 1, w.data, w.w_scale, w.w_zero, w.w_col_sums, None, None, 4, 50, w.group_k, True, 0.1, 0,
            -128, 127, torch.int8)
    assert torch.equal(torch.ops.dfqvit.qgemm(*args), reference.qgemm_reference(*args))
    from dfqvit.kernels import KernelInputError
    with pytest.raises(KernelInputError, match="K=49"):  # the op validates before the native call
        torch.ops.dfqvit.qgemm(a[:, :49], *args[1:])


def test_native_rejects_bad_arguments():
    ops = _native()
    from dfqvit.kernels import native
    with pytest.raises(RuntimeError, match="prepacked weight must be uint8"):
        ops.native_qgemm_prepacked(torch.zeros(2, 8, dtype=torch.int8), 1.0, 0, torch.zeros(1, 1, 32, dtype=torch.uint8),
                                   16, torch.ones(16), torch.zeros(16, dtype=torch.int32),
                                   torch.zeros(16, dtype=torch.int32), None, None, 4, 8, False, None, 0, 0, 0,
                                   torch.float32)
    with pytest.raises(RuntimeError, match="unknown ISA"):
        native.set_isa("neon")


def test_direct_entry_points_are_the_registered_ops():
    """native.* calls dfqvit._C's pybind entry points (bindings.cpp), not torch.ops: the same registered ops,
    bit for bit, the same kernel errors, and a TypeError for a wrong argument type (a missing extension: the next
    test)."""
    ops = _native()
    from kernel_utils import random_int8
    from dfqvit.kernels import native
    m, n, k = 37, 40, 72
    w = _weight(4, n, k)
    a = torch.randint(-128, 128, (m, k), generator=GEN).to(torch.int8)
    bias, residual = torch.randn(n, generator=GEN), torch.randn(m, n, generator=GEN)
    panels = native.prepack(w.data, 4, k, w.group_k)
    gemm = (a, 0.02, -5, panels, n, w.w_scale, w.w_zero, w.w_col_sums, bias, residual, 4, k)
    for tail in ((True, None, 0, 0, 0, torch.float32), (False, 0.05, 3, -128, 127, torch.int8)):
        assert torch.equal(native.qgemm_prepacked(*gemm, *tail), ops.native_qgemm_prepacked(*gemm, *tail))
    grid = torch.tensor([[0.05] * n, [1.0] * n, [-128.0] * n, [127.0] * n])
    assert torch.equal(native.qgemm_prepacked_columns(*gemm[:9], 4, k, grid),
                       ops.native_qgemm_prepacked(*gemm[:9], None, 4, k, False, None, 0, 0, 0, torch.int8, grid))
    norm = (torch.randn(n, generator=GEN), torch.randn(n, generator=GEN), 1e-6, 0.03, 2, -128, 127)
    for got, want in zip(native.qgemm_prepacked_norm(*gemm, *norm), ops.native_qgemm_prepacked_norm(*gemm, *norm)):
        assert torch.equal(got, want)
    x = torch.randn(m, n, generator=GEN)
    assert torch.equal(native.layernorm_quant(x, *norm), ops.native_layernorm_quant(x, *norm))
    assert torch.equal(native.quantize(x, 0.02, 1, -128, 127), ops.native_quantize(x, 0.02, 1, -128, 127))
    q, kk, v = (random_int8((2, 3, 17, 8), GEN) for _ in range(3))
    attn = (q, kk, v, 0.03, 3, 0.025, -5, 0.05, 1, 0.35, None, None, native.P_MODE_LOG2, 0.8, 0, 8, torch.float32)
    assert torch.equal(native.attention(*attn), ops.native_attention(*attn))
    with pytest.raises(RuntimeError, match=r"a must be int8 \(M, K=72\)"):  # the kernel's check, as through torch.ops
        native.qgemm_prepacked(a[:, :50], *gemm[1:], False, None, 0, 0, 0, torch.float32)
    with pytest.raises(TypeError, match="qgemm_prepacked"):
        native._ext().qgemm_prepacked(a, "0.02", *gemm[2:], False, None, 0, 0, 0, torch.float32, None)


def test_direct_entry_points_check_their_numbers():
    """native.* skipped the number checks of the torch.ops entry points: out_scale NaN / 0 / negative, qmin > qmax
    went through, and qmin/qmax = +-1000 wrapped a code of -885 to -117; attention took p_mode 5, p_bits 0,
    q_zero 300, p_delta -1; layernorm_quant eps -1 or NaN. Now each raises a KernelInputError. Zero points outside
    int8 stay allowed (up to 2**24, exact in fp32): the engine's grids have them (zero -185 after a max pool)."""
    _native()
    from kernel_utils import random_int8
    from dfqvit.kernels import KernelInputError, native
    m, n, k = 3, 5, 40
    w = _weight(4, n, k)
    a = random_int8((m, k), GEN)
    panels = native.prepack(w.data, 4, k, w.group_k)
    gemm = (a, 0.02, 3, panels, n, w.w_scale, w.w_zero, w.w_col_sums, None, None, 4, k, False)
    for out_grid, match in (((float("nan"), 0, -128, 127), "out_scale=nan"), ((0.0, 0, -128, 127), "out_scale=0"),
                            ((-0.1, 0, -128, 127), "out_scale=-0.1"), ((1e-42, 0, -128, 127), "normal fp32"),
                            ((0.1, 0, 10, -10), "out_qmax=-10"), ((0.1, 2 ** 25, -128, 127), "out_zero=33554432"),
                            ((0.001, 0, -1000, 1000), "out_qmin=-1000")):
        with pytest.raises(KernelInputError, match=match):
            native.qgemm_prepacked(*gemm, *out_grid, torch.int8)
        with pytest.raises(KernelInputError, match=match):
            native.quantize(torch.randn(4), *out_grid)
        x = torch.randn(2, n)
        with pytest.raises(KernelInputError, match=match):
            native.layernorm_quant(x, torch.ones(n), torch.zeros(n), 1e-6, *out_grid)
        with pytest.raises(KernelInputError, match=match):
            native.qgemm_prepacked_norm(*gemm[:12], torch.ones(n), torch.zeros(n), 1e-6, *out_grid)
    x = torch.randn(4, 8, generator=GEN) * 3
    assert torch.equal(native.quantize(x, 0.02, -185, -128, 127),
                       reference.uniform_quantize(x, 0.02, -185, -128, 127).to(torch.int8))
    for column in ((0.0, 0.0, -128.0, 127.0), (0.1, 0.0, 100.0, -100.0), (0.1, 0.0, -1000.0, 1000.0)):
        grid = torch.tensor([column] * n).T.contiguous()
        with pytest.raises(KernelInputError, match="out_grid column 0"):
            native.qgemm_prepacked_columns(*gemm[:9], 4, k, grid)
    # the C++ kernel took a float64 / float16 grid without the column check: qmax 300 saturated codes at 127
    bad = torch.tensor([(0.001, 3.0, -300.0, 300.0)] * n).T.contiguous()
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(KernelInputError, match=f"float32 \\(4, N\\) tensor .*got {dtype}"):
            native.qgemm_prepacked_columns(*gemm[:9], 4, k, bad.to(dtype))
    for eps in (-1.0, float("nan")):
        with pytest.raises(KernelInputError, match="eps="):
            native.layernorm_quant(torch.randn(2, n), torch.ones(n), torch.zeros(n), eps, 0.1, 0, -128, 127)
        with pytest.raises(KernelInputError, match="eps="):
            native.qgemm_prepacked_norm(*gemm[:12], torch.ones(n), torch.zeros(n), eps, 0.1, 0, -128, 127)
    q, kk, v = (random_int8((1, 2, 5, 8), GEN) for _ in range(3))

    def attention(p_mode=native.P_MODE_LOG2, p_param=0.9, p_bits=4, q_zero=0):
        return native.attention(q, kk, v, 0.1, q_zero, 0.1, 0, 0.1, 0, 0.3, None, None, p_mode, p_param, 0, p_bits,
                                torch.float32)

    for kwargs, match in ((dict(p_mode=5), "p_mode=5"), (dict(p_bits=0), "p_bits=0"), (dict(q_zero=300), "q_zero=300"),
                          (dict(p_param=-1.0), "p_delta=-1.0"), (dict(p_param=1e-45), "p_delta=.*normal fp32"),
                          (dict(p_mode=native.P_MODE_LINEAR, p_param=0.0), "p_scale=0.0")):
        with pytest.raises(KernelInputError, match=match):
            attention(**kwargs)


def test_direct_entry_points_without_the_extension(monkeypatch):
    _native()
    from dfqvit.errors import MissingBackendError
    from dfqvit.kernels import native
    monkeypatch.setattr(native, "_LOADED", False)
    monkeypatch.setattr(native, "_EXT", None)
    with pytest.raises(MissingBackendError, match="DFQVIT_BUILD_EXT=1"):
        native.quantize(torch.zeros(3), 0.1, 0, -128, 127)
    # switched off by the environment: building again would not help (the message said to build it)
    monkeypatch.setenv("DFQVIT_NATIVE", "0")
    with pytest.raises(MissingBackendError, match="switched off .DFQVIT_NATIVE=0 is set.: unset DFQVIT_NATIVE") as err:
        native.quantize(torch.zeros(3), 0.1, 0, -128, 127)
    assert "DFQVIT_BUILD_EXT" not in str(err.value)


# --- attention ------------------------------------------------------------------------------------------

ATTN_SHAPES = [(2, 3, 65, 16), (1, 2, 17, 24), (1, 1, 197, 64), (3, 1, 1, 8), (2, 1, 16, 32), (1, 2, 9, 13),
               (1, 1, 77, 8), (1, 1, 90, 8), (1, 1, 100, 8), (1, 2, 128, 64), (2, 1, 130, 80), (1, 1, 65, 64)]
# 16 keys: no padding keys; d 13: the 4-column and scalar P.V tails; 65, 77, 90 keys: QK^T in one block of 9, 10,
# 12 vectors; 100 and 197: blocks of 8 vectors, then 5 and 9. AMX P.V (d >= 64; 128+ keys, or 65 keys at 3-4 bits):
# 128 keys in two whole 64-key chunks, 130 and 197 with a short last chunk, d 80 in column groups of 4 and 1 tiles,
# 197 = 12 blocks of 16 query rows and one of 5.


@pytest.mark.parametrize("b,h,n,d", ATTN_SHAPES)
@pytest.mark.parametrize("p_bits", [3, 4, 8])
def test_native_log2_attention_is_bit_exact(isa, b, h, n, d, p_bits):
    from kernel_utils import random_int8
    from dfqvit.kernels import native
    q, k, v = (random_int8((b, h, n, d), GEN) for _ in range(3))
    args = (q, k, v, 0.03, 3, 0.025, -5, 0.05, 1, d ** -0.5, None, None)
    out_dtype = torch.float16 if p_bits == 4 else torch.float32
    expected = reference.attention_log2_reference(*args, 0.8, p_bits, out_dtype)
    assert torch.equal(native.attention(*args, native.P_MODE_LOG2, 0.8, 0, p_bits, out_dtype), expected)
    assert torch.equal(torch.ops.dfqvit.attention_log2(*args, 0.8, p_bits, out_dtype), expected)


def test_native_attention_bias_mask_and_v_zero_on_the_amx_pv_shapes(isa):
    """The AMX P.V adds v_zero * sum_j W_j apart from the raw-V planes: a large V zero point, with Swin's bias and
    mask, at shapes that take it (d 64, 130 keys; 65 keys at 4 bits) and, on other ISAs, the float64 path."""
    from kernel_utils import random_int8
    from dfqvit.kernels import native
    for n, p_bits in [(130, 8), (65, 4)]:
        h, d = 2, 64
        q, k, v = (random_int8((2, h, n, d), GEN) for _ in range(3))
        bias = torch.randn(h, n, n, generator=GEN)
        mask = torch.where(torch.rand(2, n, n, generator=GEN) < 0.3, -100.0, 0.0)
        args = (q, k, v, 0.03, 3, 0.025, -5, 0.05, -100, d ** -0.5, bias, mask)
        expected = reference.attention_log2_reference(*args, 0.9, p_bits, torch.float32)
        assert torch.equal(native.attention(*args, native.P_MODE_LOG2, 0.9, 0, p_bits, torch.float32), expected)


@pytest.mark.parametrize("layout", ["tokens", "d_strided"])
def test_native_attention_head_loading_edges(isa, layout):
    """Q/K/V are read per head into centred buffers (AVX2: 16 values a step, K through 8 x 8 transposes): d = 40
    and 23 keys leave partial blocks on both axes; a non-unit stride along d takes the generic loop."""
    from kernel_utils import random_int8
    from dfqvit.kernels import native
    b, h, n, d = 2, 2, 23, 40
    if layout == "tokens":  # (B, N, 3, H, d) split into (B, H, N, d) views, as the engine's qkv output
        q, k, v = (t.transpose(1, 2) for t in random_int8((b, n, 3, h, d), GEN).unbind(2))
    else:
        q, k, v = (random_int8((b, h, d, n), GEN).transpose(2, 3) for _ in range(3))
    args = (q, k, v, 0.03, -7, 0.025, 9, 0.05, -3, d ** -0.5, None, None)
    expected = reference.attention_log2_reference(*args, 0.8, 8, torch.float32)
    assert torch.equal(native.attention(*args, native.P_MODE_LOG2, 0.8, 0, 8, torch.float32), expected)


def test_native_attention_swin_bias_mask_linear_and_strided_inputs(isa):
    from kernel_utils import random_int8
    from dfqvit.kernels import native
    windows, images, h, n, d = 2, 2, 2, 49, 32
    qkv = random_int8((windows * images, n, 3, h, d), GEN)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # strided (B, H, N, d) views, as the engine passes
    bias = torch.randn(h, n, n, generator=GEN)
    mask = torch.where(torch.rand(windows, n, n, generator=GEN) < 0.3, -100.0, 0.0)
    args = (q, k, v, 0.03, 3, 0.025, -5, 0.05, 1, d ** -0.5, bias, mask)
    expected = reference.attention_log2_reference(*args, 1.0, 4, torch.float32)
    assert torch.equal(native.attention(*args, native.P_MODE_LOG2, 1.0, 0, 4, torch.float32), expected)
    p_scale = 1.0 / 250
    expected = reference.attention_linear_reference(*args, p_scale, 3, 8, torch.bfloat16)
    assert torch.equal(native.attention(*args, native.P_MODE_LINEAR, p_scale, 3, 8, torch.bfloat16), expected)
    assert torch.equal(torch.ops.dfqvit.attention_linear(*args, p_scale, 3, 8, torch.bfloat16), expected)


# --- engine ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit", "swin", "deit_distilled"])
@pytest.mark.parametrize("bits", [(4, 8), (4, 4), (8, 8), (3, 8), (4, 16)], ids=lambda b: f"W{b[0]}A{b[1]}")
def test_engine_native_backend_equals_torch_backend(name, bits):
    """The whole engine with and without the extension: identical logits, less weight memory (CPU panels pad K
    to 4, not to the 64/128 packing group)."""
    _native()
    import dfqvit
    from dfqvit.engine import build_engine
    from conftest import TINY_MODELS
    model = TINY_MODELS[name]()
    torch.manual_seed(1)
    qmodel = dfqvit.compile(model, bits=bits, calib=torch.randn(4, 3, 32, 32), recon=None, correction=None,
                            progress=False, backend="fake")
    x = torch.randn(6, 3, 32, 32, generator=GEN)
    native_engine, torch_engine = build_engine(qmodel, backend="native"), build_engine(qmodel, backend="torch")
    from dfqvit.kernels import native
    assert native_engine.backend == "native" and f"backend=native (isa={native.isa()})" in repr(native_engine)
    with torch.no_grad():
        assert torch.equal(native_engine(x), torch_engine(x))
    if bits[1] != 16 and bits[0] <= 4:
        assert native_engine.weight_nbytes() <= torch_engine.weight_nbytes()


def test_engine_native_backend_on_the_trained_cifar_model():
    """W4A8 on the CIFAR reference ViT: native == torch backend, bit for bit, on 64 test images."""
    _native()
    import dfqvit
    from dfqvit.engine import build_engine
    from conftest import load_cifar_images, load_cifar_model
    model, norm = load_cifar_model()
    calib, _, x = load_cifar_images(norm, test_images=64)
    qmodel = dfqvit.compile(model, bits=(4, 8), calib=calib, normalization=norm, recon=None, progress=False,
                            backend="fake")
    with torch.no_grad():
        assert torch.equal(build_engine(qmodel, backend="native")(x), build_engine(qmodel, backend="torch")(x))


def test_native_backend_errors_say_what_to_do(monkeypatch):
    from dfqvit.engine.backends import select_kernels
    from dfqvit.errors import DFQViTError, MissingBackendError, MissingGPUError
    from dfqvit.kernels import native
    monkeypatch.setattr(native, "_LOADED", False)
    with pytest.raises(MissingBackendError, match="DFQVIT_BUILD_EXT=1") as raised:
        select_kernels("native", torch.device("cpu"))
    assert not isinstance(raised.value, MissingGPUError)  # a missing extension is not a missing GPU
    assert select_kernels("auto", torch.device("cpu")).name == "torch"
    monkeypatch.setattr(native, "_LOADED", True)
    with pytest.raises(DFQViTError, match="runs on the CPU"):
        select_kernels("native", torch.device("meta"))


# --- LayerNorm + quantize, quantize ---------------------------------------------------------------------

@pytest.mark.parametrize("c", [1, 17, 48, 192, 768])
def test_native_layernorm_quant_and_quantize_are_bit_exact(isa, c):
    from dfqvit.kernels import native
    # 269 rows: blocks of 8 and of 4 rows and single rows, on one thread or two
    x = torch.randn(269, c, generator=GEN) * 3 + 0.5
    w, b = torch.randn(c, generator=GEN), torch.randn(c, generator=GEN)
    for scale, zero in ((0.02, -2), (0.011, 5)):
        expected = reference.layernorm_quant_reference(x, w, b, 1e-6, scale, zero, -128, 127)
        assert torch.equal(native.layernorm_quant(x, w, b, 1e-6, scale, zero, -128, 127), expected)
        assert torch.equal(native.layernorm_quant(x.half(), w, b, 1e-5, scale, zero, -8, 7),
                           reference.layernorm_quant_reference(x.half(), w, b, 1e-5, scale, zero, -8, 7))
    # Values on exact rounding ties (k + 1/2 steps) round half to even, like torch.round.
    y = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * 0.25
    assert torch.equal(native.quantize(y, 0.25, 3, -128, 127),
                       reference.uniform_quantize(y, 0.25, 3, -128, 127).to(torch.int8))


@pytest.mark.parametrize("p_bits", [3, 4])
def test_native_attention_int16_pv_at_the_int32_bound(isa, p_bits):
    """AVX2's int16 P.V sums up to 256 keys per int32 chunk at 4 bits (256 * 2**15 * 255 < 2**31): with every weight
    at its largest (a tiny delta puts every key at code 0: W = 2**S) and every |v - v_zero| at 255, 600 keys make two
    chunks at the bound and a short third; a chunk of 264 keys would overflow. Exact against the reference."""
    from dfqvit.kernels import native
    b, h, n, d = 1, 1, 600, 24
    q, k = (torch.randint(-128, 128, (b, h, n, d), generator=GEN).to(torch.int8) for _ in range(2))
    v = torch.full((b, h, n, d), -128, dtype=torch.int8)
    v[..., 0, :3] = 127  # one key and a few columns of the other sign
    args = (q, k, v, 0.03, 3, 0.025, -5, 0.05, 127, d ** -0.5, None, None)
    expected = reference.attention_log2_reference(*args, 1e-30, p_bits, torch.float32)
    assert expected.abs().max() > 0
    assert torch.equal(native.attention(*args, native.P_MODE_LOG2, 1e-30, 0, p_bits, torch.float32), expected)


@pytest.mark.parametrize("p_zero", [200, -3, 40000])
def test_native_linear_attention_weights_that_do_or_do_not_fit_int16(isa, p_zero):
    """Linear codes take the int16 P.V when p_zero - code fits int16 (200, -3), the float64 one when not (40000)."""
    from kernel_utils import random_int8
    from dfqvit.kernels import native
    q, k, v = (random_int8((2, 2, 70, 40), GEN) for _ in range(3))
    args = (q, k, v, 0.03, 3, 0.025, -5, 0.05, -2, 40 ** -0.5, None, None)
    expected = reference.attention_linear_reference(*args, 1 / 250, p_zero, 8, torch.float32)
    assert torch.equal(native.attention(*args, native.P_MODE_LINEAR, 1 / 250, p_zero, 8, torch.float32), expected)


def test_native_attention_longer_than_one_exact_chunk():
    """Rows of more than 8192 keys sum P.V in float64 chunks added in int64 (one chunk would not stay below
    2**53 in the worst case): still the reference's exact integers."""
    from kernel_utils import random_int8
    from dfqvit.kernels import native
    q, k, v = (random_int8((1, 1, 8200, 4), GEN) for _ in range(3))
    args = (q, k, v, 0.03, 3, 0.025, -5, 0.05, 1, 0.5, None, None)
    expected = reference.attention_log2_reference(*args, 0.8, 8, torch.float32)
    assert torch.equal(native.attention(*args, native.P_MODE_LOG2, 0.8, 0, 8, torch.float32), expected)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_native_attention_token_major_codes_equal_quantizing_the_output(isa, out_dtype):
    """token_major + out_grid (the engine's projection input) = the (B, H, N, d) result transposed to
    (B, N, H, d) and quantized by reference.uniform_quantize, bit for bit; float token-major = the transpose."""
    from kernel_utils import random_int8
    from dfqvit.kernels import native
    b, h, n, d = 3, 2, 29, 20
    q, k, v = (random_int8((b, h, n, d), GEN) for _ in range(3))
    args = (q, k, v, 0.03, 3, 0.025, -5, 0.05, 1, d ** -0.5, None, None, native.P_MODE_LOG2, 0.8, 0, 8, out_dtype)
    plain = native.attention(*args)
    grid = (0.004, -3, -128, 127)
    codes = native.attention(*args, out_grid=grid, token_major=True)
    assert codes.dtype == torch.int8 and codes.shape == (b, n, h, d)
    expected = reference.uniform_quantize(plain.transpose(1, 2).float(), *grid).to(torch.int8)
    assert torch.equal(codes, expected)
    assert torch.equal(native.attention(*args, token_major=True), plain.transpose(1, 2))
    from dfqvit.kernels import KernelInputError
    with pytest.raises(KernelInputError, match="out_zero=33554432"):  # past 2**24: not exact where it is added
        native.attention(*args, out_grid=(0.004, 2 ** 25, -128, 127), token_major=True)


def test_a_bad_isa_in_the_environment_is_named():
    """DFQVIT_NATIVE_ISA=avx3 raised the extension's RuntimeError as a traceback out of the CLI. The extension reads
    the variable once per process, so this runs in a fresh one."""
    import subprocess
    import sys

    _native()
    code = ("from dfqvit.kernels import native\n"
            "try:\n    native.isa()\nexcept Exception as exc:\n    print(type(exc).__name__, exc)")
    env = {**__import__("os").environ, "DFQVIT_NATIVE_ISA": "avx3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("KernelInputError DFQVIT_NATIVE_ISA='avx3': unknown ISA 'avx3'; allowed: auto, scalar")
    assert "or use backend='torch'" in out
