"""Packed GEMM: Triton kernel vs reference (exact int32 accumulator, epilogues), the op, errors.

Tolerances: the int32 accumulator is compared with ``torch.equal`` everywhere. Float epilogues run the
same fp32 operations in the same order as the reference (GELU included: ``portable_math.gelu`` has no libm
call), so under the interpreter they are bit-exact; on a GPU the compiler may contract a multiply-add into
an FMA (one rounding instead of two), hence ``rtol=1e-5`` and re-quantized codes within one step of the
reference on at most 0.1% of elements. The weight-only path only differs
in fp32 summation order: SQNR >= 100 dB (fp32 output).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dfqvit.kernels import GemmConfig, KernelInputError, MissingGPUError, linear_a8, linear_w16, pack_weight
from dfqvit.kernels import reference
from dfqvit.kernels._common import require_triton_device
from dfqvit.kernels import qgemm as qgemm_module
from dfqvit.kernels.qgemm import (qgemm_accumulator_triton, qgemm_columns_triton, qgemm_triton, qgemm_w16_triton,
                                 use_unpack_first)
from kernel_utils import INTERPRETED, TRITON_DEVICE, gpu, random_int8, random_weight, requires_triton, sqnr_db

GEN = torch.Generator().manual_seed(7)
SHAPES = [(1, 17, 40), (3, 48, 72), (65, 17, 100)]  # M, N, K: none a multiple of the blocks


def _packed(bits, n, k, group_k=None):
    codes, scale, zero = random_weight(bits, n, k, GEN)
    if bits <= 4 and group_k is None:
        group_k = 16 if bits == 4 else 32  # small groups so odd K spans several groups
    return codes, pack_weight(codes, scale, zero, bits, group_k=group_k)


def _config(weight, block_k_groups=1):
    block_k = max(32, weight.group_k * block_k_groups)
    return GemmConfig(block_m=16, block_n=16, block_k=block_k, group_m=2, num_warps=4, num_stages=2)


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@requires_triton
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_accumulator_is_exact(bits, m, n, k):
    codes, w = _packed(bits, n, k)
    a = random_int8((m, k), GEN)
    a_zero = -7
    expected = reference.qgemm_accumulator_reference(a, a_zero, codes, w.w_zero)
    a_d, data, zero, col = _to(TRITON_DEVICE, a, w.data, w.w_zero, w.w_col_sums)
    acc = qgemm_accumulator_triton(a_d, a_zero, data, zero, col, w.storage_bits, k, w.group_k, config=_config(w, 2))
    assert acc.dtype == torch.int32
    assert torch.equal(acc.cpu(), expected)


@requires_triton
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("bias,gelu,residual", [(False, False, False), (True, True, True), (True, False, True)])
def test_float_epilogue_matches_reference(bits, bias, gelu, residual):
    m, n, k = 33, 48, 100
    _, w = _packed(bits, n, k)
    a = random_int8((m, k), GEN)
    b = torch.randn(n, generator=GEN) if bias else None
    r = torch.randn(m, n, generator=GEN).half() if residual else None
    args = (a, 0.05, 3, w.data, w.w_scale, w.w_zero, w.w_col_sums, b, r, w.storage_bits, k, w.group_k, gelu,
            None, 0, 0, 0, torch.float32)
    expected = reference.qgemm_reference(*args)
    got = qgemm_triton(*_to(TRITON_DEVICE, *args[:1]), *args[1:3], *_to(TRITON_DEVICE, *args[3:9]), *args[9:],
                       config=_config(w))
    if INTERPRETED:
        assert torch.equal(got, expected)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@requires_triton
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("gelu", [False, True])
def test_requantized_int8_output(bits, m, n, k, gelu):
    _, w = _packed(bits, n, k)
    a = random_int8((m, k), GEN)
    b = torch.randn(n, generator=GEN)
    r = torch.randn(m, n, generator=GEN)
    args = (a, 0.02, -4, w.data, w.w_scale, w.w_zero, w.w_col_sums, b, r, w.storage_bits, k, w.group_k, gelu,
            0.04, 5, -128, 127, torch.int8)
    expected = reference.qgemm_reference(*args)
    got = qgemm_triton(*_to(TRITON_DEVICE, a), 0.02, -4, *_to(TRITON_DEVICE, *args[3:9]), *args[9:],
                       config=_config(w)).cpu()
    assert got.dtype == torch.int8
    diff = (got.int() - expected.int()).abs()
    if INTERPRETED:
        assert torch.equal(got, expected)
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3


@requires_triton
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("round_dtype", [torch.float32, torch.float16])
def test_per_column_requant_equals_quantizing_the_float_output(bits, round_dtype):
    """The qkv epilogue: one grid per column (q, k, v parts), after rounding to the residual dtype; the codes
    must equal quantizing the kernel's own ``round_dtype`` output column by column (no tolerance)."""
    m, n, k = 37, 48, 100
    _, w = _packed(bits, n, k)
    a = random_int8((m, k), GEN)
    b = torch.randn(n, generator=GEN)
    grid = torch.stack([torch.rand(n, generator=GEN) * 0.05 + 0.01, torch.randint(-6, 6, (n,), generator=GEN).float(),
                        torch.full((n,), -128.0), torch.full((n,), 127.0)])
    grid[2, : n // 3], grid[3, : n // 3] = -8, 7  # a 4-bit third, like A4 q
    dev = _to(TRITON_DEVICE, a, w.data, w.w_scale, w.w_zero, w.w_col_sums, b, grid)
    codes = qgemm_columns_triton(dev[0], 0.02, -4, *dev[1:6], w.storage_bits, k, w.group_k, dev[6], round_dtype,
                                 config=_config(w)).cpu()
    y = qgemm_triton(dev[0], 0.02, -4, *dev[1:6], None, w.storage_bits, k, w.group_k, False, None, 0, 0, 0,
                     round_dtype, config=_config(w)).cpu()
    expected = reference.uniform_quantize(y.float(), grid[0], grid[1], grid[2], grid[3]).to(torch.int8)
    assert codes.dtype == torch.int8 and torch.equal(codes, expected)
    assert int(codes[:, : n // 3].min()) >= -8 and int(codes[:, : n // 3].max()) <= 7
    with pytest.raises(KernelInputError, match="out_grid"):
        qgemm_columns_triton(dev[0], 0.02, -4, *dev[1:6], w.storage_bits, k, w.group_k, dev[6][:3], round_dtype)


@requires_triton
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_only_matches_reference(bits, dtype):
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 dots on raw bits (numpy has no bf16); GPU only")
    m, n, k = 65, 17, 100
    _, w = _packed(bits, n, k)
    x = torch.randn(m, k, generator=GEN).to(dtype)
    b = torch.randn(n, generator=GEN)
    r = torch.randn(m, n, generator=GEN)
    args = (x, w.data, w.w_scale, w.w_zero, b, r, w.storage_bits, k, w.group_k, True, torch.float32)
    expected = reference.qgemm_w16_reference(*args)
    got = qgemm_w16_triton(*_to(TRITON_DEVICE, *args[:6]), *args[6:], config=_config(w))
    assert sqnr_db(expected, got.cpu()) >= 100


@requires_triton
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_unpack_first_accumulator_is_exact(bits, m, n, k):
    """The unpack-first path (dense W - w_zero, then an int8 GEMM) gives the same int32 accumulator."""
    codes, w = _packed(bits, n, k)
    a = random_int8((m, k), GEN)
    expected = reference.qgemm_accumulator_reference(a, -7, codes, w.w_zero)
    a_d, data, zero, col = _to(TRITON_DEVICE, a, w.data, w.w_zero, w.w_col_sums)
    acc = qgemm_accumulator_triton(a_d, -7, data, zero, col, w.storage_bits, k, w.group_k,
                                   config=replace(_config(w), unpack_first=True))
    assert torch.equal(acc.cpu(), expected)


@requires_triton
@pytest.mark.parametrize("bits", [3, 4])
def test_unpack_first_epilogues_equal_the_fused_path(bits):
    """Same accumulator, same epilogue: fp16 + GELU + residual, int8 re-quantization and per-column codes agree
    bit for bit with the fused-unpack path (and so with the reference, which the other tests check)."""
    m, n, k = 33, 48, 100
    _, w = _packed(bits, n, k)
    a = random_int8((m, k), GEN)
    b, r = torch.randn(n, generator=GEN), torch.randn(m, n, generator=GEN).half()
    grid = torch.stack([torch.rand(n, generator=GEN) * 0.05 + 0.01, torch.randint(-5, 5, (n,), generator=GEN).float(),
                        torch.full((n,), -128.0), torch.full((n,), 127.0)])
    a_d, data, scale, zero, col, b_d, r_d, grid_d = _to(TRITON_DEVICE, a, w.data, w.w_scale, w.w_zero, w.w_col_sums,
                                                        b, r, grid)
    common = (a_d, 0.02, 3, data, scale, zero, col, b_d)

    def epilogues(unpack_first):
        cfg = replace(_config(w), unpack_first=unpack_first)
        return (qgemm_triton(*common, r_d, bits, k, w.group_k, True, None, 0, 0, 0, torch.float16, config=cfg),
                qgemm_triton(*common, None, bits, k, w.group_k, False, 0.05, 2, -128, 127, torch.int8, config=cfg),
                qgemm_columns_triton(*common, bits, k, w.group_k, grid_d, torch.float16, config=cfg))

    for fused_out, dense_out in zip(epilogues(False), epilogues(True)):
        assert torch.equal(fused_out.cpu(), dense_out.cpu())


@requires_triton
@pytest.mark.parametrize("bits", [3, 4])
def test_unpack_first_weight_only_matches_reference(bits):
    m, n, k = 65, 17, 100
    _, w = _packed(bits, n, k)
    x = torch.randn(m, k, generator=GEN).half()
    b, r = torch.randn(n, generator=GEN), torch.randn(m, n, generator=GEN)
    args = (x, w.data, w.w_scale, w.w_zero, b, r, w.storage_bits, k, w.group_k, True, torch.float32)
    expected = reference.qgemm_w16_reference(*args)
    got = qgemm_w16_triton(*_to(TRITON_DEVICE, *args[:6]), *args[6:], config=replace(_config(w), unpack_first=True))
    assert sqnr_db(expected, got.cpu()) >= 100


def test_unpack_first_rule_by_rows_environment_and_config(monkeypatch):
    monkeypatch.delenv("DFQVIT_UNPACK_FIRST_MIN_M", raising=False)
    assert not use_unpack_first(None, qgemm_module.UNPACK_FIRST_MIN_M - 1, 4)
    assert use_unpack_first(None, qgemm_module.UNPACK_FIRST_MIN_M, 3)
    assert not use_unpack_first(None, 10 ** 6, 8)  # int8 rows are dense already
    assert use_unpack_first(GemmConfig(unpack_first=True), 1, 4)
    assert not use_unpack_first(GemmConfig(unpack_first=False), 10 ** 6, 4)
    monkeypatch.setenv("DFQVIT_UNPACK_FIRST_MIN_M", "0")
    assert use_unpack_first(None, 1, 4)
    monkeypatch.setenv("DFQVIT_UNPACK_FIRST_MIN_M", "lots")
    with pytest.raises(KernelInputError, match="DFQVIT_UNPACK_FIRST_MIN_M='lots'"):
        use_unpack_first(None, 1, 4)


@pytest.mark.parametrize("dense,float_a", [(False, False), (True, False), (True, True)])
def test_quick_autotune_tiles_fit_shared_memory(monkeypatch, dense, float_a):
    """DFQVIT_AUTOTUNE=quick at batch 64: three tiles per key, each within the shared-memory budget for its
    operand bytes (fp16 dense weights are twice int8), the unpack-first int8 GEMM including a 256-deep K step."""
    monkeypatch.setenv("DFQVIT_AUTOTUNE", "quick")
    tuner = qgemm_module._qgemm_kernel_autotuned
    args = dict(STORAGE_BITS=8 if dense else 4, GROUP_K=1 if dense else 64, M_BUCKET=16384, FLOAT_A=float_a,
                W_DENSE=dense)
    kept = qgemm_module._prune_configs(tuner.configs, {}, **args)
    assert len(kept) == 3
    a_bytes = w_bytes = 2 if float_a else 1
    if not dense:
        w_bytes = 0.5
    for c in kept:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert c.num_stages * (bm * bk * a_bytes + bk * bn * w_bytes) <= qgemm_module._SMEM_BUDGET_BYTES
    deep = [c for c in kept if c.kwargs["BLOCK_K"] == 256]
    assert bool(deep) == (dense and not float_a)


@requires_triton
def test_autotuned_launch_takes_the_path_the_rule_picks(monkeypatch):
    """Without a config the launch follows use_unpack_first: the dense weight is built only when it says so."""
    codes, w = _packed(4, 17, 40)
    a = random_int8((3, 40), GEN)
    expected = reference.qgemm_accumulator_reference(a, 1, codes, w.w_zero)
    calls = []
    real = qgemm_module.unpack_centered_triton
    monkeypatch.setattr(qgemm_module, "unpack_centered_triton", lambda *args: calls.append(1) or real(*args))
    args = _to(TRITON_DEVICE, a, w.data, w.w_zero, w.w_col_sums)
    for min_m, used in (("4", False), ("3", True)):
        monkeypatch.setenv("DFQVIT_UNPACK_FIRST_MIN_M", min_m)
        calls.clear()
        acc = qgemm_accumulator_triton(args[0], 1, *args[1:], 4, 40, w.group_k)
        assert bool(calls) == used and torch.equal(acc.cpu(), expected)


@requires_triton
def test_default_interpreter_config_and_several_groups_per_block():
    """BLOCK_K spanning several packing groups (int4 G=16, block 64) and the default config."""
    codes, w = _packed(4, 48, 100, group_k=16)
    a = random_int8((65, 100), GEN)
    expected = reference.qgemm_accumulator_reference(a, 2, codes, w.w_zero)
    a_d, data, zero, col = _to(TRITON_DEVICE, a, w.data, w.w_zero, w.w_col_sums)
    for config in (GemmConfig(block_m=32, block_n=16, block_k=64, group_m=1), None):
        acc = qgemm_accumulator_triton(a_d, 2, data, zero, col, 4, 100, 16, config=config)
        assert torch.equal(acc.cpu(), expected)


@requires_triton
def test_default_config_covers_a_default_int3_group():
    """config=None with the default int3 group (128 K positions, more than the interpreter's BLOCK_K of 64): the
    default launch must take BLOCK_K >= group_k, not refuse a config nobody passed (it did on the CPU)."""
    codes, scale, zero = random_weight(3, 17, 40, GEN)
    w = pack_weight(codes, scale, zero, 3)
    assert w.group_k == 128
    a = random_int8((3, 40), GEN)
    dev = _to(TRITON_DEVICE, a, w.data, w.w_scale, w.w_zero, w.w_col_sums)
    tail = (None, None, 3, 40, 128, False, None, 0, 0, 0, torch.float32)
    expected = reference.qgemm_reference(a, 0.02, 3, w.data, w.w_scale, w.w_zero, w.w_col_sums, *tail)
    assert torch.allclose(qgemm_triton(dev[0], 0.02, 3, *dev[1:], *tail).cpu(), expected, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 40, generator=GEN).half()
    expected = reference.qgemm_w16_reference(x, w.data, w.w_scale, w.w_zero, None, None, 3, 40, 128, False,
                                             torch.float32)
    got = qgemm_w16_triton(*_to(TRITON_DEVICE, x), *dev[1:4], None, None, 3, 40, 128, False, torch.float32)
    assert sqnr_db(expected, got.cpu()) >= 100


def test_per_column_grid_values_are_checked():
    """The per-column grid's values follow check_requant_grid's rules (scale 0, qmin > qmax, a range past int8
    wrapped -885 to -117; zero points up to 2**24, as the engine's q, k, v grids may lie outside int8); only its shape
    was checked. On CPU tensors: the check runs before any launch."""
    n, k = 5, 40
    _, w = _packed(4, n, k)
    a = random_int8((3, k), GEN)
    good = [0.1, 0.0, -128.0, 127.0]
    for column in ([0.0, 0.0, -128.0, 127.0], [0.1, 0.0, 100.0, -100.0], [0.1, 0.0, -1000.0, 1000.0],
                   [0.1, 0.5, -128.0, 127.0], [1e-42, 0.0, -128.0, 127.0], [0.1, 3e7, -128.0, 127.0]):
        grid = torch.tensor([good, good, column, good, good]).T.contiguous()  # (4, N), column 2 bad
        with pytest.raises(KernelInputError, match="out_grid column 2 has"):
            qgemm_columns_triton(a, 0.02, 3, w.data, w.w_scale, w.w_zero, w.w_col_sums, None, 4, k, w.group_k, grid)


def test_requant_scales_outside_normal_fp32_are_refused():
    """out_scale must be a normal fp32 number whose reciprocal is one too: 1e-42 (subnormal) and 1e39 (past fp32)
    reached the interpreted kernel, which failed with a raw InterpreterError (Triton typed them fp64)."""
    _, w = _packed(4, 17, 40)
    a = random_int8((3, 40), GEN)
    for out_scale in (1e-42, 1e-50, 1e39, float("inf"), float("nan")):
        with pytest.raises(KernelInputError, match="normal fp32"):
            qgemm_triton(a, 0.1, 0, w.data, w.w_scale, w.w_zero, w.w_col_sums, None, None, 4, 40, w.group_k, False,
                         out_scale, 0, -128, 127, torch.int8)


@requires_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")  # y / 2**-126 -> inf, clamped
@pytest.mark.parametrize("out_scale", [2.0 ** -126, 2.0 ** 126])
def test_requant_scales_at_the_normal_fp32_bounds_run(out_scale):
    """The bounds themselves are accepted and give the reference's codes (2**-126 saturates, 2**126 gives zeros)."""
    _, w = _packed(4, 17, 40)
    a = random_int8((3, 40), GEN)
    args = (0.1, 0, w.data, w.w_scale, w.w_zero, w.w_col_sums, None, None, 4, 40, w.group_k, False, out_scale, 0,
            -128, 127, torch.int8)
    a_d, data, scale, zero, col = _to(TRITON_DEVICE, a, *args[2:6])
    got = qgemm_triton(a_d, *args[:2], data, scale, zero, col, *args[6:], config=_config(w))
    assert torch.equal(got.cpu(), reference.qgemm_reference(a, *args))


def test_ops_refuse_tensors_on_different_devices():
    """A meta bias (or residual) beside CPU tensors ran the CPU kernel on it and returned uninitialized memory."""
    _, w = _packed(4, 6, 40)
    a = random_int8((4, 40), GEN)

    def call(bias=None, residual=None):
        return torch.ops.dfqvit.qgemm(a, 0.1, 0, w.data, w.w_scale, w.w_zero, w.w_col_sums, bias, residual, 4, 40,
                                      w.group_k, False, None, 0, 0, 0, torch.float32)

    with pytest.raises(KernelInputError, match="bias on meta"):
        call(bias=torch.zeros(6, device="meta"))
    with pytest.raises(KernelInputError, match="residual on meta"):
        call(residual=torch.zeros(4, 6, device="meta"))
    with pytest.raises(KernelInputError, match="different devices"):
        torch.ops.dfqvit.qgemm_w16(a.half(), w.data, w.w_scale.to("meta"), w.w_zero, None, None, 4, 40, w.group_k,
                                   False, torch.float16)


def test_linear_front_ends_refuse_a_residual_of_another_shape():
    """A (6, 4) residual for a (4, 6) output has the right element count: a reshape alone added it in the wrong
    layout. The residual must have the output's shape (..., N)."""
    _, w = _packed(4, 6, 40)
    a = random_int8((4, 40), GEN)
    with pytest.raises(KernelInputError, match=r"residual has shape \(6, 4\); expected \(4, 6\)"):
        linear_a8(a, 0.1, 0, w, residual=torch.randn(6, 4))
    with pytest.raises(KernelInputError, match=r"residual has shape \(24,\)"):
        linear_w16(torch.randn(4, 40).half(), w, residual=torch.randn(24).half())
    y = linear_a8(a.view(2, 2, 40), 0.1, 0, w, residual=torch.randn(2, 2, 6))
    assert y.shape == (2, 2, 6)


def test_reference_is_the_dequantized_linear():
    """The reference computes a_scale * w_scale * sum (A - za)(W - zw) + bias: compare with fp64 F.linear."""
    codes, w = _packed(4, 17, 72)
    a = random_int8((5, 72), GEN)
    bias = torch.randn(17, generator=GEN)
    y = reference.qgemm_reference(a, 0.1, 3, w.data, w.w_scale, w.w_zero, w.w_col_sums, bias, None, 4, 72,
                                  w.group_k, False, None, 0, 0, 0, torch.float32)
    a_real = (a.double() - 3) * 0.1
    w_real = (codes.double() - w.w_zero.double()[:, None]) * w.w_scale.double()[:, None]
    expected = torch.nn.functional.linear(a_real, w_real, bias.double())
    assert sqnr_db(expected, y) >= 120
    g = reference.qgemm_reference(a, 0.1, 3, w.data, w.w_scale, w.w_zero, w.w_col_sums, bias, None, 4, 72,
                                  w.group_k, True, None, 0, 0, 0, torch.float32)
    assert sqnr_db(torch.nn.functional.gelu(expected), g) >= 120


def test_linear_front_ends_take_leading_dims():
    _, w = _packed(3, 17, 40)
    a = random_int8((2, 5, 40), GEN)
    y = linear_a8(a, 0.1, 0, w, torch.randn(17), out_scale=0.05)
    assert y.shape == (2, 5, 17) and y.dtype == torch.int8
    x = torch.randn(2, 5, 40).half()
    y = linear_w16(x, w, residual=torch.randn(2, 5, 17).half(), gelu=True)
    assert y.shape == (2, 5, 17) and y.dtype == torch.float16


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_qgemm_ops_opcheck(bits):
    _, w = _packed(bits, 17, 40)
    a = random_int8((3, 40), GEN)
    b = torch.randn(17)
    r = torch.randn(3, 17)
    base = (a, 0.1, 2, w.data, w.w_scale, w.w_zero, w.w_col_sums)
    torch.library.opcheck(torch.ops.dfqvit.qgemm.default,
                          (*base, b, r, bits, 40, w.group_k, True, None, 0, 0, 0, torch.float16))
    torch.library.opcheck(torch.ops.dfqvit.qgemm.default,
                          (*base, None, None, bits, 40, w.group_k, False, 0.05, -3, -128, 127, torch.int8))
    x = torch.randn(3, 40).half()
    torch.library.opcheck(torch.ops.dfqvit.qgemm_w16.default,
                          (x, w.data, w.w_scale, w.w_zero, b, r, bits, 40, w.group_k, True, torch.float32))


def test_qgemm_errors_say_what_was_given():
    _, w = _packed(4, 17, 40)
    a = random_int8((3, 40), GEN)

    def call(a=a, k=40, storage_bits=4, out_scale=None, out_dtype=torch.float16, bias=None, w_packed=w.data,
             group_k=w.group_k):
        return torch.ops.dfqvit.qgemm(a, 0.1, 0, w_packed, w.w_scale, w.w_zero, w.w_col_sums, bias, None,
                                      storage_bits, k, group_k, False, out_scale, 0, -128, 127, out_dtype)

    with pytest.raises(KernelInputError, match="dtype float32"):
        call(a=a.float())
    with pytest.raises(KernelInputError, match="bytes per row"):
        call(k=72)  # packed K does not match
    with pytest.raises(KernelInputError, match="K=72 columns"):
        call(a=random_int8((3, 72), GEN))
    with pytest.raises(KernelInputError, match="stride"):
        call(a=random_int8((40, 3), GEN).T)  # non-contiguous rows
    with pytest.raises(KernelInputError, match="storage_bits=5"):
        call(storage_bits=5)
    with pytest.raises(KernelInputError, match="must be torch.int8"):
        call(out_scale=0.1, out_dtype=torch.float16)
    with pytest.raises(KernelInputError, match="bias has shape"):
        call(bias=torch.randn(16))
    with pytest.raises(KernelInputError, match="group_k=24"):
        call(group_k=24)
    with pytest.raises(KernelInputError, match=r"dtype float32; allowed: float16, bfloat16"):
        torch.ops.dfqvit.qgemm_w16(torch.randn(3, 40), w.data, w.w_scale, w.w_zero, None, None, 4, 40, w.group_k,
                                   False, torch.float16)
    with pytest.raises(KernelInputError, match="dtype int8"):
        torch.ops.dfqvit.qgemm_w16(a, w.data, w.w_scale, w.w_zero, None, None, 4, 40, w.group_k, False,
                                   torch.float16)


@requires_triton
def test_triton_entry_checks_config():
    _, w = _packed(4, 17, 40, group_k=64)
    a = random_int8((3, 40), GEN)
    with pytest.raises(KernelInputError, match="multiple of group_k=64"):
        qgemm_accumulator_triton(*_to(TRITON_DEVICE, a), 0, *_to(TRITON_DEVICE, w.data, w.w_zero, w.w_col_sums),
                                 4, 40, 64, config=GemmConfig(block_k=32))


def test_cpu_tensors_without_interpreter_raise_missing_gpu(monkeypatch):
    class JITFunction:  # stands in for a compiled (not interpreted) Triton kernel
        pass

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MissingGPUError, match="TRITON_INTERPRET=1"):
        require_triton_device("qgemm_triton", JITFunction(), [torch.zeros(1)])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(KernelInputError, match="before importing dfqvit"):
        require_triton_device("qgemm_triton", JITFunction(), [torch.zeros(1)])


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m", [197, 1576])
def test_autotuned_cuda_kernel_at_vit_shapes(bits, m):
    """GPU only: autotuned launch (no fixed config) at DeiT-S fc1 shape, batch 1 and 8."""
    n, k = 1536, 384
    codes, scale, zero = random_weight(bits, n, k, GEN)
    w = pack_weight(codes, scale, zero, bits).to("cuda")
    a = random_int8((m, k), GEN)
    expected = reference.qgemm_accumulator_reference(a, 5, codes, zero)
    acc = qgemm_accumulator_triton(a.cuda(), 5, w.data, w.w_zero, w.w_col_sums, w.storage_bits, k, w.group_k)
    assert torch.equal(acc.cpu(), expected)
    y = torch.ops.dfqvit.qgemm(a.cuda(), 0.02, 5, w.data, w.w_scale, w.w_zero, w.w_col_sums, None, None,
                               w.storage_bits, k, w.group_k, True, None, 0, 0, 0, torch.float16)
    ref = reference.qgemm_reference(a, 0.02, 5, w.data.cpu(), scale.float(), zero, w.w_col_sums.cpu(), None, None,
                                    w.storage_bits, k, w.group_k, True, None, 0, 0, 0, torch.float32)
    assert sqnr_db(ref, y.float().cpu()) >= 60


test_autotuned_cuda_kernel_at_vit_shapes = gpu[0](gpu[1](test_autotuned_cuda_kernel_at_vit_shapes))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m", [197, 1576])
def test_autotuned_cuda_weight_only_at_vit_shapes(bits, m):
    """GPU only: W4A16/W3A16 at DeiT-S fc1, batch 1 (unpack in the K loop) and 8 (unpack-first, fp16 MMA)."""
    n, k = 1536, 384
    codes, scale, zero = random_weight(bits, n, k, GEN)
    w = pack_weight(codes, scale, zero, bits).to("cuda")
    x = torch.randn(m, k, generator=GEN).half()
    y = qgemm_w16_triton(x.cuda(), w.data, w.w_scale, w.w_zero, None, None, w.storage_bits, k, w.group_k, False,
                         torch.float32)
    ref = reference.qgemm_w16_reference(x, w.data.cpu(), scale.float(), zero, None, None, w.storage_bits, k,
                                        w.group_k, False, torch.float32)
    # Exact products, fp32 accumulation in another order (tensor cores may align the addends with truncation):
    # 80 dB, where a wrong zero point or K position gives below 30.
    assert sqnr_db(ref, y.cpu()) >= 80


test_autotuned_cuda_weight_only_at_vit_shapes = gpu[0](gpu[1](test_autotuned_cuda_weight_only_at_vit_shapes))


@pytest.mark.parametrize("k", [1, 67, 3072])
def test_exact_int_matmul_equals_int64_at_extreme_codes(k):
    """The float64 fast path of the CPU reference must give the int64 product bit for bit, also when every
    product is the largest one int8 codes allow (|255 * 255| per term)."""
    from dfqvit.kernels.reference import exact_int_matmul

    gen = torch.Generator().manual_seed(k)
    a = torch.randint(-255, 256, (5, k), generator=gen, dtype=torch.int64)
    b = torch.randint(-255, 256, (k, 7), generator=gen, dtype=torch.int64)
    a[0], b[:, 0] = 255, 255  # the worst case: every partial sum grows
    a[1], b[:, 1] = -255, 255
    got = exact_int_matmul(a, b)
    assert got.dtype == torch.int64
    assert torch.equal(got, a @ b)


@pytest.mark.parametrize("k", [258, 259])
def test_exact_matmul_fp32_on_both_sides_of_the_fp32_bound(k):
    """255 * 255 * 258 < 2**24 <= 255 * 255 * 259: the first runs on fp32 BLAS, the second on float64; both
    must give the exact integer rounded once to fp32, with every product the largest (or mixed signs)."""
    from dfqvit.kernels.reference import FP32_EXACT_SUM, exact_matmul_fp32

    gen = torch.Generator().manual_seed(k)
    a = torch.randint(-255, 256, (6, k), generator=gen).float()
    b = torch.randint(-255, 256, (k, 5), generator=gen).float()
    a[0], b[:, 0] = 255, 255
    a[1], b[:, 1] = -255, 255
    bound = 255 * 255 * k
    assert (bound < FP32_EXACT_SUM) == (k == 258)
    got = exact_matmul_fp32(a, b, bound)
    assert got.dtype == torch.float32
    assert torch.equal(got, (a.long() @ b.long()).float())


def test_reduced_fp32_matmul_precision_sends_the_reference_to_float64():
    """A user's torch.set_float32_matmul_precision('medium') may let fp32 matmuls run in bf16 / TF32; the
    exact reference must then not use fp32 BLAS."""
    from dfqvit.kernels.reference import ieee_fp32_matmul

    before = torch.get_float32_matmul_precision()
    assert ieee_fp32_matmul(torch.device("cpu")) == (before == "highest")
    try:
        torch.set_float32_matmul_precision("medium")
        assert not ieee_fp32_matmul(torch.device("cpu"))
    finally:
        torch.set_float32_matmul_precision(before)
    assert not ieee_fp32_matmul(torch.device("meta"))


def test_the_per_backend_precision_api_is_read_and_a_gpu_setting_does_not_break_the_cpu_reference():
    """torch.backends.cuda.matmul.fp32_precision = "tf32" made torch.get_float32_matmul_precision() raise ("mix of the
    legacy and new APIs"): every torch-backend forward failed. oneDNN's own bf16 setting must still send it to float64."""
    from dfqvit.kernels.reference import ieee_fp32_matmul

    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    before = cuda.fp32_precision, mkldnn.fp32_precision
    try:
        cuda.fp32_precision = "tf32"
        assert ieee_fp32_matmul(torch.device("cpu"))
        a = torch.randint(-128, 128, (4, 8), dtype=torch.int8)
        w = pack_weight(torch.randint(0, 16, (3, 8), dtype=torch.uint8), torch.ones(3), torch.full((3,), 8), 4)
        reference.qgemm_reference(a, 0.1, 0, w.data, w.w_scale, w.w_zero, w.w_col_sums, None, None, 4, 8, w.group_k,
                                  False, None, 0, 0, 0, torch.float32)
        mkldnn.fp32_precision = "bf16"
        assert not ieee_fp32_matmul(torch.device("cpu"))
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = before


def test_a_traced_reference_gemm_stays_exact_for_larger_inputs():
    """The fp32-or-float64 choice read the example input's largest code: traced on small codes, the trace summed
    large ones in fp32 past 2**24 and lost bits (the torch backend under torch.jit.trace)."""
    import warnings

    g = torch.Generator().manual_seed(0)
    w = torch.randint(101, 128, (16, 8192), dtype=torch.int8, generator=g)
    w_zero = torch.zeros(16, dtype=torch.int64)

    def accumulator(a):
        return reference.qgemm_accumulator_fp32(a, 0, w, w_zero)

    small = torch.randint(-5, 6, (4, 8192), dtype=torch.int8, generator=g)
    large = torch.randint(101, 128, (4, 8192), dtype=torch.int8, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values
        traced = torch.jit.trace(accumulator, small, check_trace=False)
    assert torch.equal(traced(large), (large.long() @ w.long().T).float())
