"""Portable fp32 math: the transcendental steps of the engine's integer path, written with IEEE-exact
operations only (``+ - * /``, min/max, round-half-even, bit casts, integer sums) in a fixed order.

Why: ``torch.erf``/``exp2``/``log2`` and fp32 row sums give different bits on different CPUs, thread
counts and tensor positions (vectorised SLEEF body, scalar libm tail, reduction order). The engine
re-quantizes after every one of these steps, so one ulp can move an int8 code. With the definitions here
the PyTorch reference, the native CPU kernels (``kernels/csrc/portable_math.h``, the same constants in the
same order) and the Triton interpreter compute identical bits; the tests compare them with ``torch.equal``.

Accuracy against the exact functions (measured over dense grids, see tests/test_kernels_portable.py):
``erf`` <= 4.5e-7 absolute, ``exp2`` <= 1e-7 relative, ``round(-log2 r)`` exact.
"""
from __future__ import annotations

import math

import torch

# Eigen's generic_fast_erf_float: erf(x) = x * P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 in fp32 outside).
ERF_CLAMP = 4.0
ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
           -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
           -1.42647390514189e-02)
SQRT1_2 = 0.7071067811865476

# 2**f = exp(f ln 2) on f in [-1/2, 1/2]: Taylor coefficients ln(2)**i / i!, i = 7 .. 0 (Horner order).
EXP2_POLY = tuple(math.log(2.0) ** i / math.factorial(i) for i in range(7, -1, -1))
EXP2_MIN_EXPONENT = -126  # below 2**-126 (fp32 subnormals) exp2 returns 0

# Row sums of softmax numerators e in [0, 1] are taken in fixed point: trunc(e * 2**53) summed in int64 is
# exact in any order (<= 256 keys * 2**53 < 2**63); terms below 2**-53 are dropped (2**-45 relative to a
# sum >= 1, far under fp32 resolution).
SUM_FIXED_POINT_BITS = 53

INV_SQRT2_F64 = 0.7071067811865476  # fp64(1/sqrt 2) lies above 1/sqrt 2 and no fp32 value lies in between


# The element-wise functions below run in place on blocks of this many elements (1 MB of fp32). Each step of
# a polynomial is one PyTorch pass; on a whole activation (the CIFAR ViT's fc1 output at batch 64: 3.2 M values,
# 12.8 MB) every pass went to memory. GELU of that tensor on the 2-core Zen 1 VM: 69 ms as whole-tensor passes,
# 50 ms in place, 20 ms in blocks of 2**18 (2**16: 42 ms, 2**14: 109 ms; each PyTorch call costs ~10 us);
# exp2 of the attention's (64, 3, 65, 65) scores 12.6 -> 4.9 ms. Every element sees the same operations in
# the same order: same bits.
BLOCK_ELEMENTS = 1 << 18


def _blockwise(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` (element-wise, fp32 in and out) of ``x``, block by block."""
    x = x.to(torch.float32)
    if x.numel() <= BLOCK_ELEMENTS:
        return fn(x)
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), BLOCK_ELEMENTS):
        out[start:start + BLOCK_ELEMENTS] = fn(flat[start:start + BLOCK_ELEMENTS])
    return out.view(x.shape)


def _horner(x: torch.Tensor, coefficients) -> torch.Tensor:
    """``(((c0 x + c1) x + c2) ...)`` with one fp32 rounding per multiply and per add (never an FMA)."""
    acc = torch.full_like(x, float(torch.tensor(coefficients[0], dtype=torch.float32)))
    for c in coefficients[1:]:
        acc.mul_(x).add_(float(torch.tensor(c, dtype=torch.float32)))
    return acc


def _erf_block(x: torch.Tensor) -> torch.Tensor:
    x = torch.clamp(x, -ERF_CLAMP, ERF_CLAMP)
    x2 = x * x
    return _horner(x2, ERF_NUM).mul_(x).div_(_horner(x2, ERF_DEN))


def erf(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``erf`` from a rational approximation: clamp to [-4, 4], ``x * P(x^2) / Q(x^2)``."""
    return _blockwise(_erf_block, x)


def _gelu_block(y: torch.Tensor) -> torch.Tensor:
    return (y * 0.5).mul_(_erf_block(y * SQRT1_2).add_(1.0))


def gelu(y: torch.Tensor) -> torch.Tensor:
    """Exact-form GELU ``y * 0.5 * (1 + erf(y / sqrt 2))`` in fp32 with the portable ``erf``."""
    return _blockwise(_gelu_block, y)


# 2**e for e in [-126, 127], made at import: a table made during a trace was recorded differently from a cached one,
# and the tracer's check failed ("Graphs differed across invocations").
_POWERS_OF_TWO = torch.tensor([2.0 ** e for e in range(-126, 128)], dtype=torch.float32)


def power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """``2**exponent`` in fp32, exactly, for int32 exponents in [-126, 127]: the exponent bits viewed as fp32. Under
    torch.jit.trace, which cannot record ``Tensor.view(dtype)`` (an internal assert in alias analysis: tracing the
    torch backend failed), the same values come from a table."""
    if not torch.jit.is_tracing():
        return ((exponent + 127) << 23).view(torch.float32)
    return _POWERS_OF_TWO.to(exponent.device)[(exponent + 126).long()]


def _exp2_block(d: torch.Tensor) -> torch.Tensor:
    n = torch.round(d)
    f = d - n
    two_n = power_of_two(n.clamp_(min=EXP2_MIN_EXPONENT).to(torch.int32))
    return _horner(f, EXP2_POLY).mul_(two_n).masked_fill_(d < EXP2_MIN_EXPONENT, 0.0)


def exp2(d: torch.Tensor) -> torch.Tensor:
    """fp32 ``2**d`` for ``d <= 0`` (softmax numerators): ``n = round(d)``, ``f = d - n`` (exact),
    ``2**f`` by a degree-7 polynomial, times ``2**n`` built from exponent bits; 0 below ``2**-126``."""
    return _blockwise(_exp2_block, d)


def row_sum(e: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of ``e`` in [0, 1] (fp32), order-independent: fixed point in int64, then one
    rounding to fp32. Keeps the dim (like ``sum(-1, keepdim=True)``)."""
    scale = float(2 ** SUM_FIXED_POINT_BITS)
    fixed = (e.to(torch.float32) * scale).to(torch.int64).sum(dim=-1, keepdim=True)
    return fixed.to(torch.float32) * (1.0 / scale)


def round_neg_log2(ratio: torch.Tensor) -> torch.Tensor:
    """``round(-log2(ratio))`` (half to even; a half never occurs) exactly, as int64, for ratio > 0.

    ``ratio = mant * 2**exp`` with ``mant`` in [1/2, 1): ``-log2 ratio = -exp - log2 mant`` and
    ``-log2 mant`` in (0, 1] rounds up to 1 exactly when ``mant < 1/sqrt 2``. No ``log2`` call, so no ulp
    of a libm decides a code. ``ratio == 0`` gives a huge value (callers clamp it to the underflow code).
    """
    mant, exp = torch.frexp(ratio)
    k = (mant.double() < INV_SQRT2_F64).to(torch.int64) - exp.to(torch.int64)
    return torch.where(ratio > 0, k, torch.full_like(k, 1 << 30))


def sequential_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of fp32 ``x`` as ``fp32(((x0 + x1) + x2) + ...)`` accumulated in float64, keeping
    the dim. ``cumsum`` on the CPU accumulates in float64 in index order (ATen's acc_type), so its last
    element is exactly that; the native LayerNorm runs the same loop (tests check both against an explicit
    float64 loop). Cost: one sequential pass, fine for a reference."""
    return x.to(torch.float32).cumsum(dim=-1)[..., -1:]


def sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (IEEE ``sqrt``, what C++ ``std::sqrt`` and Triton ``sqrt_rn`` give).
    ``torch.sqrt`` on the CPU can be one ulp off; two fix-up rounds compare ``v`` with the squares of the
    midpoints to the neighbours, exact in float64 (25-bit midpoints square to 50 bits)."""
    v = v.to(torch.float32)
    s = torch.sqrt(v)
    vd = v.double()
    for _ in range(2):
        down, up = torch.nextafter(s, torch.zeros_like(s)), torch.nextafter(s, torch.full_like(s, float("inf")))
        sd = s.double()
        low, high = (sd + down.double()) / 2, (sd + up.double()) / 2
        s = torch.where(vd < low * low, down, torch.where(vd >= high * high, up, s))
    return s
