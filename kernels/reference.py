"""Pure-PyTorch reference of every kernel's math (no triton import, ever).

The quantization functions at the top are the single source of truth for rounding: the fake-quant
modules in ``dfqvit.quant`` call them, and every Triton kernel must reproduce them bit for bit
(true division ``x / scale`` in fp32, round half to even = ``torch.round`` = ``rint``).
"""
from __future__ import annotations

import torch


def uniform_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """SPDFQ eq. 1: ``clamp(round(x / scale) + zero_point, qmin, qmax)``; integral values, x's dtype.

    ``scale`` and ``zero_point`` broadcast against ``x`` (scalars for per-tensor, shaped for per-channel).
    """
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def uniform_dequantize(q: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """Inverse map of :func:`uniform_quantize` onto the grid: ``scale * (q - zero_point)``."""
    return (q - zero_point) * scale


def log2_quantize(p: torch.Tensor, delta, bits: int) -> torch.Tensor:
    """SPDFQ eq. 2 with the zero-mask convention of FQ-ViT / RepQ-ViT.

    Returns exponent codes ``k = clamp(round(-log2(p / delta)), 0)`` as integral values of p's dtype.
    Exponents at or beyond ``2**bits`` cannot be stored; they get the code ``2**bits``, which
    dequantizes to exactly 0 (an underflowed probability), not to the smallest level.
    """
    levels = 2 ** bits
    # Clamp before log2: softmax underflows to 0 (log2 -> -inf); any ratio this small lands in the
    # zero bin anyway.
    ratio = torch.clamp(p / delta, min=2.0 ** -(levels + 2))
    k = torch.clamp(torch.round(-torch.log2(ratio)), min=0)
    return torch.where(k >= levels, torch.full_like(k, levels), k)


def log2_dequantize(codes: torch.Tensor, delta, bits: int) -> torch.Tensor:
    """``delta * 2**-k`` for stored codes, 0 for the underflow code ``2**bits``."""
    levels = 2 ** bits
    value = delta * torch.exp2(-codes)
    return torch.where(codes >= levels, torch.zeros_like(value), value)
