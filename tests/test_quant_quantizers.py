"""Quantizer properties: round trip, clipping, log2 levels, percentile search vs min/max, STE, state_dict."""
import pytest
import torch

from dfqvit.errors import CalibrationError, UnsupportedBitsError
from dfqvit.quant import Log2Quantizer, UniformQuantizer, search_uniform
from dfqvit.quant.functional import uniform_qrange
from dfqvit.kernels.reference import uniform_quantize, uniform_dequantize


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_grid_points_round_trip_exactly(bits, signed):
    q = UniformQuantizer(bits, signed=signed)
    q.scale.fill_(0.37)
    q.zero_point.fill_(0 if signed else 3)
    qmin, qmax = uniform_qrange(bits, signed)
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float32)
    assert torch.equal(q.quantize(q.dequantize(codes)), codes)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_values_are_clipped_to_the_code_range(bits):
    q = UniformQuantizer(bits)
    q.scale.fill_(0.1)
    q.zero_point.fill_(2)
    x = torch.linspace(-100, 100, 1001)
    codes = q.quantize(x)
    assert codes.min() == 0 and codes.max() == 2 ** bits - 1
    assert torch.equal(codes, codes.round())
    # inside the range the error is at most half a step
    inside = (x > -0.2) & (x < 0.1 * (2 ** bits - 3))
    assert (q.fake(x)[inside] - x[inside]).abs().max() <= 0.05 + 1e-6


def test_rounding_is_half_to_even_like_the_kernels():
    assert torch.equal(uniform_quantize(torch.tensor([0.5, 1.5, 2.5, -0.5]), 1.0, 0, -8, 7),
                       torch.tensor([0.0, 2.0, 2.0, -0.0]))


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_log2_levels_are_powers_of_two_and_underflow_is_zero(bits):
    q = Log2Quantizer(bits)
    q.delta.fill_(0.5)
    p = torch.cat([torch.rand(2000), torch.tensor([0.0, 1e-30, 1.0])])
    xhat = q.fake(p)
    nonzero = xhat[xhat > 0]
    exponents = torch.log2(nonzero / 0.5)
    assert torch.equal(exponents, exponents.round()), "every non-zero level is delta * 2^-k"
    assert exponents.max() <= 0 and exponents.min() >= -(2 ** bits - 1)
    assert xhat[-3] == 0 and xhat[-2] == 0, "zero and underflowed probabilities map to exactly 0"


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_percentile_search_never_worse_than_minmax(bits):
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((20000,))  # heavy tails: min/max wastes levels
    scale, zero = search_uniform(x, bits, (0.999, 0.9999, 0.99999))
    lo, hi = x.min(), x.max()
    mm_scale = (hi - lo) / (2 ** bits - 1)
    mm_zero = torch.round(-lo / mm_scale)

    def mse(s, z):
        return float((uniform_dequantize(uniform_quantize(x, s, z, 0, 2 ** bits - 1), s, z) - x).pow(2).mean())

    assert mse(scale, zero) <= mse(mm_scale, mm_zero)
    if bits <= 4:
        assert mse(scale, zero) < 0.9 * mse(mm_scale, mm_zero), "with heavy tails the search should win"


def test_per_channel_search_is_per_row():
    torch.manual_seed(0)
    w = torch.randn(6, 50) * torch.arange(1, 7).view(6, 1)
    q = UniformQuantizer(4, channels=6, percentiles=(0.97, 0.99, 0.9999))
    q.calibrate(w)
    assert q.scale.shape == (6,)
    assert torch.all(q.scale[1:] > q.scale[:-1]), "row scale grows with the row's magnitude"


def test_state_dict_round_trips_exactly():
    torch.manual_seed(0)
    w = torch.randn(8, 20)
    a = UniformQuantizer(5, channels=8)
    a.calibrate(w)
    b = UniformQuantizer(5, channels=8)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.fake(w), b.fake(w))
    assert bool(b.initialized)
    with pytest.raises(UnsupportedBitsError):
        UniformQuantizer(4, channels=8).load_state_dict(a.state_dict())


def test_straight_through_gradient():
    q = UniformQuantizer(4)
    q.scale.fill_(0.1)
    q.zero_point.fill_(0)
    x = torch.tensor([0.33, 0.71, 5.0, -1.0], requires_grad=True)
    q.fake(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0])), "identity inside the range, 0 where clipped"
    ql = Log2Quantizer(4)
    p = torch.tensor([0.0, 0.3, 0.9], requires_grad=True)
    ql.fake(p).sum().backward()
    assert torch.equal(p.grad, torch.ones(3)), "log2 uses a plain STE (no 0/0 at p = 0)"


def test_uncalibrated_quantizer_refuses_to_run():
    with pytest.raises(CalibrationError):
        UniformQuantizer(4)(torch.randn(3))


@pytest.mark.parametrize("bits", [2, 9, 16])
def test_unsupported_quantizer_bits(bits):
    with pytest.raises(UnsupportedBitsError, match="allowed"):
        UniformQuantizer(bits)
