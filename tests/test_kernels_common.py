"""The Triton math helpers of ``kernels/_common.py`` against their PyTorch definitions, value by value.

Tolerances: none — rint equals ``torch.round`` (and after a clamp to an int8 grid, for any input), exp2 equals
``portable_math.exp2`` bit for bit, and the int -> float conversion is exact. Run under the interpreter (numpy
fp32 arithmetic, IEEE round-to-nearest like the GPU) and, on a CUDA machine, compiled (``gpu_session.sh`` runs
this file): there the compiler may contract exp2's polynomial into FMAs, so exp2 may differ by 2**-22 relative;
rint and the conversion have no multiply-add and stay exact.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from dfqvit.kernels import portable_math
from dfqvit.kernels._common import exp2_nonpositive, rint, small_int_to_float
from kernel_utils import TRITON_DEVICE, requires_triton

BLOCK = 1024


@triton.jit
def _apply(x_ptr, y_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    if OP == 0:
        y = rint(x)
    elif OP == 1:
        y = tl.minimum(tl.maximum(rint(x), -128.0), 127.0)
    elif OP == 2:
        y = exp2_nonpositive(x)
    else:
        y = small_int_to_float(x)
    tl.store(y_ptr + i, y, mask=i < n)


def _run(op, x, out_dtype=torch.float32):
    x_d = x.to(TRITON_DEVICE)
    y = torch.empty(x.shape, dtype=out_dtype, device=TRITON_DEVICE)
    _apply[(triton.cdiv(x.numel(), BLOCK),)](x_d, y, x.numel(), OP=op, BLOCK=BLOCK)
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
