"""Fake quantization with a straight-through estimator.

Forward values come from the shared functions of ``dfqvit.kernels.reference`` (so fake-quant and the
integer kernels round identically); only the gradient is a surrogate:
- uniform: STE on the rounding, clipping differentiated normally (I&S ``round_ste``, METHODS §1.1);
- log2: plain STE, never differentiating log2 (0/0 at underflowed probabilities, Pitfall 4).
"""
from __future__ import annotations

import torch

from dfqvit.kernels.reference import (
    log2_dequantize,
    log2_quantize,
    uniform_dequantize,
    uniform_quantize,
)

__all__ = [
    "uniform_quantize", "uniform_dequantize", "log2_quantize", "log2_dequantize",
    "fake_quantize_uniform", "fake_quantize_log2", "uniform_qrange",
]


def uniform_qrange(bits: int, signed: bool):
    """Integer range of a ``bits``-bit code: [0, 2^b - 1] asymmetric, [-2^(b-1), 2^(b-1) - 1] signed."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def fake_quantize_uniform(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    value = uniform_dequantize(uniform_quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)
    if not _needs_grad(x):
        return value
    # Same function with the rounding removed: d/dx = 1 inside the clipping range, 0 outside.
    surrogate = (torch.clamp(x / scale + zero_point, qmin, qmax) - zero_point) * scale
    return value.detach() + (surrogate - surrogate.detach())


def fake_quantize_log2(x: torch.Tensor, delta, bits: int) -> torch.Tensor:
    value = log2_dequantize(log2_quantize(x, delta, bits), delta, bits)
    if not _needs_grad(x):
        return value
    return value.detach() + (x - x.detach())
