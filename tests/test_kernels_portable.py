"""portable_math: accuracy against exact (float64 / math) functions, order independence, exact rounding.

Floors: erf <= 5e-7 absolute, GELU <= 2e-6 absolute (|y| <= 8, where one fp32 ulp is 1e-6), exp2 <= 1.5e-7 relative on [-126, 0],
round(-log2 r) identical to float64 ``round(-log2 r)`` away from ties, row sums equal the correctly rounded
exact sum for any column order.
"""
from __future__ import annotations

import math

import pytest
import torch

from dfqvit.kernels import portable_math, reference


def test_erf_and_gelu_close_to_exact():
    x = torch.linspace(-8, 8, 400_001)
    exact = torch.special.erf(x.double())
    assert float((portable_math.erf(x).double() - exact).abs().max()) <= 5e-7
    gelu_exact = x.double() * 0.5 * (1 + torch.special.erf(x.double() / math.sqrt(2)))
    assert float((portable_math.gelu(x).double() - gelu_exact).abs().max()) <= 2e-6  # fp32 ulp(8) ~ 1e-6
    assert portable_math.gelu(x).dtype == torch.float32


def test_exp2_relative_error_and_edges():
    d = torch.cat([torch.linspace(-126, 0, 1_000_001), torch.tensor([0.0, -0.5, -1.5, -125.5])])
    e = portable_math.exp2(d)
    exact = torch.exp2(d.double())
    assert float(((e.double() - exact) / exact).abs().max()) <= 1.5e-7
    assert float(portable_math.exp2(torch.tensor([0.0]))) == 1.0  # the row maximum is exactly 1
    assert torch.equal(portable_math.exp2(torch.tensor([-126.5, -300.0, float("-inf")])), torch.zeros(3))


def test_row_sum_is_order_independent_and_correctly_rounded():
    gen = torch.Generator().manual_seed(0)
    e = portable_math.exp2(-torch.rand(64, 197, generator=gen) * 30)
    s = portable_math.row_sum(e)
    perm = torch.randperm(197, generator=gen)
    assert torch.equal(s, portable_math.row_sum(e[:, perm]))
    exact = e.double().sum(-1, keepdim=True)
    assert torch.equal(s, exact.float())  # the fixed-point truncation (< 2**-45 relative) never shows


def test_round_neg_log2_is_exact():
    gen = torch.Generator().manual_seed(1)
    r = torch.cat([torch.exp2(-torch.rand(200_000, generator=gen) * 40), torch.exp2(-torch.arange(0, 150.0)),
                   torch.tensor([1.5, 2.0 ** -149, 3e-45])])
    k = portable_math.round_neg_log2(r)
    assert torch.equal(k, torch.round(-torch.log2(r.double())).to(torch.int64))
    # The boundary 2**-(j + 1/2) is irrational: the fp32 values on either side round apart.
    below = torch.tensor(2.0 ** -3.5, dtype=torch.float32)
    above = torch.nextafter(below, torch.tensor(1.0))
    assert sorted(portable_math.round_neg_log2(torch.stack([below, above])).tolist()) == [3, 4]
    assert int(portable_math.round_neg_log2(torch.tensor([0.0]))) >= 2 ** 30


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log2_quantize_matches_float64_definition(bits):
    gen = torch.Generator().manual_seed(bits)
    p = torch.softmax(torch.randn(50, 197, generator=gen) * 4, dim=-1)
    delta = 0.7
    codes = reference.log2_quantize(p, delta, bits)
    ratio = torch.clamp(p.double() / delta, min=2.0 ** -(2 ** bits + 2))
    k = torch.clamp(torch.round(-torch.log2(ratio)), min=0)
    expected = torch.where(k >= 2 ** bits, torch.full_like(k, 2 ** bits), k)
    # float64 ratio vs fp32 ratio differ in the last fp32 bit: allow it to matter on a handful of entries.
    assert float((codes.double() != expected).float().mean()) <= 1e-4


def test_sqrt_is_correctly_rounded():
    """torch.sqrt on the CPU is not IEEE-exact (about 15% of these inputs differ by an ulp); the portable one is."""
    import numpy as np
    v = torch.cat([torch.rand(500_000, generator=torch.Generator().manual_seed(3)) * 10, torch.tensor([0.25, 4.0, 1e-6])])
    assert np.array_equal(portable_math.sqrt(v).numpy(), np.sqrt(v.numpy()))


def test_sequential_sum_is_the_float64_loop():
    x = torch.randn(64, 197, generator=torch.Generator().manual_seed(4)) * 5
    acc = torch.zeros(64, dtype=torch.float64)
    for j in range(197):
        acc = acc + x[:, j].double()
    assert torch.equal(portable_math.sequential_sum(x)[:, 0], acc.float())


def test_powers_of_two_are_the_same_under_tracing(monkeypatch):
    """The table the tracer uses (it cannot record Tensor.view(dtype)) gives the exponent-bit values exactly."""
    exponents = torch.arange(-126, 128, dtype=torch.int32)
    bits = portable_math.power_of_two(exponents)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    table = portable_math.power_of_two(exponents)
    assert torch.equal(bits, table) and torch.equal(table, torch.tensor([2.0 ** e for e in range(-126, 128)]))
