"""The Triton math helpers of ``kernels/_common.py`` against their PyTorch definitions, value by value.

Tolerances: none — rint equals ``torch.round`` (and after a clamp to an int8 grid, for any input), exp2 equals
``portable_math.exp2`` bit for bit, the int -> float conversion is exact, and the re-quantization of the fused
epilogues (``uniform_quantize_int``: Markstein's division on a GPU, ``div_rn`` under the interpreter) equals
``reference.uniform_quantize`` code for code. Run under the interpreter (numpy
fp32 arithmetic, IEEE round-to-nearest like the GPU) and, on a CUDA machine, compiled (``gpu_session.sh`` runs
this file): there the compiler may contract exp2's polynomial into FMAs, so exp2 may differ by 2**-22 relative;
rint and the conversion have no multiply-add and stay exact. GELU's hardware division on a GPU is checked by
emulation (bounded, not exact).
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import numpy as np

from dfqvit.kernels import KernelInputError, portable_math, reference
from dfqvit.kernels._common import (check_requant_grid, exp2_nonpositive, reciprocal_fp32, rint, small_int_to_float,
                                    uniform_quantize_int)
from kernel_utils import TRITON_DEVICE, requires_triton

BLOCK = 1024


@triton.jit
def _apply(x_ptr, y_ptr, n, scale, inv_scale, OP: tl.constexpr, BLOCK: tl.constexpr, HW_FMA: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    if OP == 4:
        y = uniform_quantize_int(x, scale, inv_scale, 3.0, -128.0, 127.0, HW_FMA)
    elif OP == 0:
        y = rint(x)
    elif OP == 1:
        y = tl.minimum(tl.maximum(rint(x), -128.0), 127.0)
    elif OP == 2:
        y = exp2_nonpositive(x)
    else:
        y = small_int_to_float(x)
    tl.store(y_ptr + i, y, mask=i < n)


def _run(op, x, out_dtype=torch.float32, scale=1.0):
    x_d = x.to(TRITON_DEVICE)
    y = torch.empty(x.shape, dtype=out_dtype, device=TRITON_DEVICE)
    _apply[(triton.cdiv(x.numel(), BLOCK),)](x_d, y, x.numel(), scale, reciprocal_fp32(scale), OP=op, BLOCK=BLOCK,
                                             HW_FMA=TRITON_DEVICE == "cuda")
    return y.cpu()


@requires_triton
def test_rint_rounds_half_to_even_below_two_to_the_22():
    gen = torch.Generator().manual_seed(3)
    ties = torch.arange(-300, 300, dtype=torch.float32) + 0.5
    near = torch.tensor([0.49999997, -0.49999997, 1.5000001, 2.4999998, 4194303.5, -4194303.5, 0.0, -0.0])
    spread = (torch.rand(20_000, generator=gen) * 2 - 1) * 2.0 ** torch.randint(-20, 22, (20_000,), generator=gen)
    x = torch.cat([ties, near, spread.float()])
    assert torch.equal(_run(0, x), torch.round(x))


@requires_triton
def test_rint_then_clamp_matches_for_any_magnitude():
    """What the quantizers do: clamp(rint(x)) to an int8 grid is right even where rint alone is out of range."""
    big = torch.tensor([2.0 ** 22, 2.0 ** 22 + 0.5, 3e7, 2.0 ** 24 + 2, 1e30, 3.4e38, float("inf")])
    x = torch.cat([big, -big, torch.tensor([127.5, 128.5, -128.5, -127.5])])
    assert torch.equal(_run(1, x), torch.clamp(torch.round(x), -128, 127))


@requires_triton
def test_exp2_equals_portable_math_bit_for_bit():
    d = torch.cat([torch.linspace(-127, 0, 200_001), torch.arange(-127, 1, dtype=torch.float32) + 0.5,
                   torch.tensor([-126.0, -126.49999, -126.50001, -0.0])])
    d = d[d <= 0]
    got, expected = _run(2, d), portable_math.exp2(d)
    if TRITON_DEVICE == "cuda":
        assert torch.allclose(got, expected, rtol=2.0 ** -22, atol=0.0)
    else:
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@requires_triton
def test_small_int_to_float_is_exact():
    limit = 2 ** 22 - 1
    i = torch.cat([torch.arange(-1000, 1000), torch.tensor([limit, -limit, 4161600, -4161600]),
                   torch.randint(-limit, limit + 1, (10_000,), generator=torch.Generator().manual_seed(5))])
    assert torch.equal(_run(3, i.to(torch.int32)), i.float())


def _near_ties(scale: float, gen, n: int) -> torch.Tensor:
    """Values whose x / scale is at or within a few ulps of a half-integer (where a wrong quotient shows)."""
    k = torch.randint(-200, 200, (n,), generator=gen).double() + 0.5
    x = (k * scale).float()
    steps = torch.randint(-3, 4, (n,), generator=gen).to(torch.int32)
    return (x.view(torch.int32) + steps).view(torch.float32)


def test_markstein_division_is_correctly_rounded():
    """The claim behind _common.divide_rn on a GPU: with inv = RN(1/s), q = RN(x * inv), r = fma(-q, s, x) and
    RN(q + r * inv) (true FMAs, emulated in 64-bit long double) equal the IEEE quotient RN(x / s) on every sample:
    5 M random pairs over 12 decades and 400 k values at or next to rounding ties (q alone differs on ~26%)."""
    rng = np.random.default_rng(0)
    n = 5_000_000
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32)
    s = (10.0 ** rng.uniform(-4, 1, n)).astype(np.float32)
    gen = torch.Generator().manual_seed(9)
    for scale in (0.0123, 0.05, 0.3, 1.7e-3):
        ties = _near_ties(scale, gen, 100_000).numpy()
        x = np.concatenate([x, ties])
        s = np.concatenate([s, np.full(ties.shape, scale, dtype=np.float32)])
    inv = np.float32(1) / s
    q = x * inv
    wide = np.longdouble
    r = (wide(x) - wide(q) * wide(s)).astype(np.float32)  # one rounding, as fma.rn
    corrected = (wide(q) + wide(r) * wide(inv)).astype(np.float32)
    assert np.array_equal(corrected, x / s)
    assert np.mean(q != x / s) > 0.1  # the correction is doing the work


def _nudge(x: torch.Tensor, ulps: int) -> torch.Tensor:
    """x moved by ``ulps`` units in the last place (toward +inf for ulps > 0)."""
    target = torch.full_like(x, float("inf") if ulps > 0 else float("-inf"))
    for _ in range(abs(ulps)):
        x = torch.nextafter(x, target)
    return x


@pytest.mark.parametrize("ulps", [-2, -1, 1, 2])
def test_gelu_with_the_hardware_division_stays_within_its_bound(ulps):
    """The claim behind ``gelu_erf(HW_DIV=True)`` on a GPU: ``div.approx.ftz.f32`` returns P/Q within 2 ulp for
    |Q| in [2**-126, 2**126] (Q lies in [-2.4, -0.014] here), so GELU moves by at most 3e-7 * max(|x|, 1), and
    re-quantized codes (fc2's int8 grid) change on at most 2e-5 of the inputs — only those within ~1e-7 relative
    of a rounding tie. (Flushing a subnormal P/Q to 0 moves erf by < 2**-126.) Emulated here by moving erf's
    quotient by 1-2 ulp (worst case, every element the same way) over 2 M points of [-8, 8]; an 8-ulp error
    breaks the bound."""
    x = torch.linspace(-8, 8, 2_000_001, dtype=torch.float32)
    reference_gelu = portable_math.gelu(x)
    z = torch.clamp(x * portable_math.SQRT1_2, -portable_math.ERF_CLAMP, portable_math.ERF_CLAMP)
    denominator = portable_math._horner(z * z, portable_math.ERF_DEN)
    assert -2.5 < float(denominator.min()) and float(denominator.max()) < -0.014  # inside div.approx's range
    quotient = (z * portable_math._horner(z * z, portable_math.ERF_NUM)) / denominator
    assert torch.equal(x * 0.5 * (1.0 + quotient), reference_gelu)  # the emulation starts from the reference

    def gelu_moved(by: int) -> torch.Tensor:
        return x * 0.5 * (1.0 + _nudge(quotient, by))

    relative = lambda g: ((g - reference_gelu).abs() / x.abs().clamp(min=1.0)).max().item()  # noqa: E731
    assert relative(gelu_moved(ulps)) <= 3e-7
    assert relative(gelu_moved(8 * ulps)) > 3e-7  # the bound is tight enough to notice a worse division
    for scale in (0.0123, 0.05):
        moved = reference.uniform_quantize(gelu_moved(ulps), scale, 0, -128, 127)
        codes = reference.uniform_quantize(reference_gelu, scale, 0, -128, 127)
        assert (moved != codes).float().mean().item() <= 2e-5


@requires_triton
@pytest.mark.parametrize("scale", [0.0123, 0.05, 1.7e-3])
def test_uniform_quantize_int_equals_the_reference(scale):
    """The fused epilogues' int8 re-quantization (compiled: Markstein's division and the magic-constant int) against
    reference.uniform_quantize, including values on and next to rounding ties and far outside the grid."""
    gen = torch.Generator().manual_seed(10)
    spread = torch.randn(50_000, generator=gen) * scale * 80
    far = torch.tensor([1e30, -1e30, 3e38, -3e38, 1e6, -1e6]) * scale
    x = torch.cat([spread, _near_ties(scale, gen, 50_000), far]).float()
    got = _run(4, x, torch.int32, scale)
    assert torch.equal(got, reference.uniform_quantize(x, scale, 3.0, -128, 127).to(torch.int32))


@triton.jit
def _quantize_zero(x_ptr, z_ptr, y_ptr, n, scale, inv_scale, zero, PER_ELEMENT: tl.constexpr, BLOCK: tl.constexpr,
                   HW_FMA: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    if PER_ELEMENT:  # a tensor of zero points, as the GEMM's per-column grids
        y = uniform_quantize_int(x, scale, inv_scale, tl.load(z_ptr + i, mask=i < n), -128.0, 127.0, HW_FMA)
    else:
        y = uniform_quantize_int(x, scale, inv_scale, zero, -128.0, 127.0, HW_FMA)
    tl.store(y_ptr + i, y, mask=i < n)


LARGE_ZEROS = [2 ** 21 - 1, 2 ** 21, -2 ** 21, 2 ** 21 + 1, -2 ** 21 - 1, 2 ** 22 - 1, 2 ** 22, -2 ** 22 - 3, 5_000_000,
               -5_000_001, 2 ** 23 - 1, 2 ** 23, -2 ** 23, 2 ** 23 + 1, 12_345_677, 2 ** 24 - 1, -2 ** 24]


@requires_triton
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_uniform_quantize_int_with_zero_points_up_to_the_bound(scale):
    """Zero points up to ZERO_POINT_BOUND = 2**24 (grids outside int8 are allowed): an unclamped code then comes from
    x / scale near -zero, past the 2**22 up to which the magic-constant rint rounds. It rounded 5000001 to 5000000
    (zero -5000000: code 0 instead of 1, and 8388607 with zero -8388600 gave 8 instead of 7); the reference and the
    native kernel were right. Now the zero point goes into the rounding's magic constant. Checked around -zero in
    quarter steps, next to every half, and spread over all magnitudes; small zero points too."""
    gen = torch.Generator().manual_seed(11)
    zeros = [0, 3, -100, 127, -128, 300, -5000, 1_000_001] + LARGE_ZEROS
    xs, zs = [], []
    for z in zeros:
        steps = -z + torch.arange(-600, 601, dtype=torch.float64) / 4
        halves = (-z + torch.arange(-140, 140, dtype=torch.float64) + 0.5).float()
        near = torch.cat([halves.nextafter(torch.tensor(float("inf"))), halves.nextafter(torch.tensor(-float("inf")))])
        spread = (torch.rand(500, generator=gen) * 2 - 1) * 2.0 ** torch.randint(-4, 26, (500,), generator=gen)
        d = torch.cat([steps.float(), halves, near, spread.float(), torch.tensor([2.0 ** 24, -2.0 ** 24, 3e37, -3e37])])
        xs.append((d.double() * scale).float())
        zs.append(torch.full_like(d, float(z)))
    x, z_col = torch.cat(xs), torch.cat(zs)
    expected = reference.quantize_codes(x, scale, z_col, -128, 127, torch.int32)
    assert int((expected.abs() < 128).sum()) > 30_000  # mostly unclamped codes
    n = x.numel()
    got = torch.empty(n, dtype=torch.int32, device=TRITON_DEVICE)
    _quantize_zero[(triton.cdiv(n, BLOCK),)](x.to(TRITON_DEVICE), z_col.to(TRITON_DEVICE), got, n, scale,
                                             reciprocal_fp32(scale), 0.0, PER_ELEMENT=True, BLOCK=BLOCK,
                                             HW_FMA=TRITON_DEVICE == "cuda")
    wrong = (got.cpu() != expected).nonzero()[:, 0]
    assert not len(wrong), f"{len(wrong)} differ, first x={x[wrong[:3]].tolist()} zero={z_col[wrong[:3]].tolist()}"
    for z in (-5_000_000, 2 ** 23 - 1, 7, -2 ** 24):  # a scalar zero point, as the per-tensor grids
        sel = z_col == z
        one = torch.empty(int(sel.sum()), dtype=torch.int32, device=TRITON_DEVICE)
        _quantize_zero[(triton.cdiv(one.numel(), BLOCK),)](x[sel].to(TRITON_DEVICE), one, one, one.numel(), scale,
                                                           reciprocal_fp32(scale), float(z), PER_ELEMENT=False,
                                                           BLOCK=BLOCK, HW_FMA=TRITON_DEVICE == "cuda")
        assert torch.equal(one.cpu(), expected[sel])


@requires_triton
def test_nan_quantizes_to_qmin_in_the_kernels_and_the_reference():
    """NaN: the kernels' max/min (and native's fmax/fmin) give qmin; the reference's torch.clamp kept NaN, whose int8
    cast gave 0 -- not the "identical bits" the backends promise. Per-tensor and per-column bounds alike."""
    x = torch.tensor([float("nan"), 1.0, -1.0, float("inf"), -float("inf")])
    got = _run(4, x, torch.int32, 0.05)
    expected = reference.quantize_codes(x, 0.05, 3.0, -128, 127, torch.int32)
    assert torch.equal(got, expected) and int(expected[0]) == -128
    columns = reference.quantize_codes(x, 0.05, 3.0, torch.full((5,), -8.0), torch.full((5,), 7.0), torch.int32)
    assert columns.tolist() == [-8, 7, -8, 7, -8]
    assert reference.uniform_quantize(x, 0.05, 3.0, -128, 127)[0].isnan()  # the fake-quant values keep NaN


def test_requant_scale_must_be_a_normal_fp32_with_a_normal_reciprocal():
    """Scales past fp32 (1e39) or subnormal in it (1e-42) crashed the interpreted kernels (Triton typed them fp64):
    the grid check allows [2**-126, 2**126], where the scale and reciprocal_fp32 of it are normal fp32 numbers."""
    for scale in (2.0 ** -126, 2.0 ** 126, 0.05):
        check_requant_grid("test", scale, 0, -128, 127)
        inv = np.float32(reciprocal_fp32(scale))
        assert np.isfinite(inv) and inv >= np.finfo(np.float32).tiny
    below = float(np.nextafter(2.0 ** -126, 0.0))
    for scale in (below, 2.0 ** 126 * 1.0000001, 1e-42, 1e39, 0.0, -0.1, float("inf"), float("nan")):
        with pytest.raises(KernelInputError, match="normal fp32"):
            check_requant_grid("test", scale, 0, -128, 127)


def test_column_grids_are_checked_once_per_version():
    """The native qkv GEMM passes the same grid (as a fresh view) on every forward: checked once (each check cost
    ~10% of a batch-1 forward), and again after anything writes into it."""
    from dfqvit.kernels._common import check_requant_columns

    grid = torch.tensor([[0.1, 0.2], [0.0, 3.0], [-128.0, -8.0], [127.0, 7.0], [10.0, 5.0]])
    check_requant_columns("test", grid[:4])
    assert grid._dfqvit_checked is not None
    grid[0, 1] = float("nan")
    with pytest.raises(KernelInputError, match="column 1"):
        check_requant_columns("test", grid[:4])
