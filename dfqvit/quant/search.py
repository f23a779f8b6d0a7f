"""Range search: percentile candidates scored by quantization MSE (METHODS §1.2, RepQ / I&S).

Every search also scores the plain min/max range (percentile 1.0), so the chosen range is never
worse than min/max on the data it saw. Quantiles are read from one sort (``torch.quantile`` refuses
tensors over ~2^24 elements, Pitfall 5); larger tensors are searched on an evenly strided subsample.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .functional import log2_dequantize, log2_quantize, uniform_dequantize, uniform_quantize

_MIN_SCALE = 1e-8


def subsample(x: torch.Tensor, max_elements: int) -> torch.Tensor:
    """Flattened ``x``, or every k-th element of it when it has more than ``max_elements``."""
    flat = x.detach().reshape(-1)
    if flat.numel() > max_elements:
        step = -(-flat.numel() // max_elements)
        flat = flat[::step]
    return flat


def _quantiles_of_sorted(sorted_rows: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation quantiles (torch.quantile's rule) of each row: (rows, D) -> (len(ps), rows)."""
    n = sorted_rows.shape[-1]
    pos = ps.to(sorted_rows.dtype) * (n - 1)
    lo_idx = pos.floor().long().clamp(0, n - 1)
    hi_idx = (lo_idx + 1).clamp(max=n - 1)
    frac = (pos - lo_idx.to(pos.dtype)).unsqueeze(-1)
    lo_val = sorted_rows[:, lo_idx].T
    hi_val = sorted_rows[:, hi_idx].T
    return lo_val + frac * (hi_val - lo_val)


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool):
    """Eq. 1 parameters for a clipping range: (scale, zero_point); symmetric when ``signed``."""
    levels = 2 ** bits - 1
    if signed:
        scale = torch.maximum(lo.abs(), hi.abs()) / (levels / 2)
        scale = scale.clamp(min=_MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / levels).clamp(min=_MIN_SCALE)
    zero_point = torch.round(-lo / scale)
    return scale, zero_point


def search_uniform(
    x: torch.Tensor,
    bits: int,
    percentiles: Sequence[float],
    signed: bool = False,
    per_channel: bool = False,
    max_elements: int = 1 << 24,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best (scale, zero_point) for ``x``: per tensor (0-dim results) or per row of dim 0 ((C,) results).

    Candidates: for each p, hi = quantile(p), lo = quantile(1 - p), plus min/max. Score = mean squared
    error of the fake-quantized values (per row when ``per_channel``).
    """
    from .functional import uniform_qrange

    qmin, qmax = uniform_qrange(bits, signed)
    if per_channel:
        rows = x.detach().reshape(x.shape[0], -1).float()
    else:
        rows = subsample(x, max_elements).float().unsqueeze(0)
    sorted_rows = rows.sort(dim=-1).values
    ps = torch.tensor(sorted(set(float(p) for p in percentiles) | {1.0}), device=rows.device)
    his = _quantiles_of_sorted(sorted_rows, ps)          # (P, rows)
    los = _quantiles_of_sorted(sorted_rows, 1.0 - ps)    # (P, rows)
    best_err = torch.full((rows.shape[0],), float("inf"), device=rows.device)
    best_scale = torch.ones(rows.shape[0], device=rows.device)
    best_zero = torch.zeros(rows.shape[0], device=rows.device)
    for lo, hi in zip(los, his):
        scale, zero = range_to_qparams(lo, hi, bits, signed)
        s, z = scale.unsqueeze(1), zero.unsqueeze(1)
        err = (uniform_dequantize(uniform_quantize(rows, s, z, qmin, qmax), s, z) - rows).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    if per_channel:
        return best_scale, best_zero
    return best_scale[0], best_zero[0]


def search_log2(
    x: torch.Tensor, bits: int, percentiles: Sequence[float], max_elements: int = 1 << 24
) -> torch.Tensor:
    """Best log2 ``delta`` for non-negative ``x`` (softmax outputs), METHODS §1.3.

    Candidates: upper quantiles of x (RepQ's log quantizer), delta = 1 (FQ-ViT, softmax <= 1) and max(x).
    """
    flat = subsample(x, max_elements).float()
    sorted_flat = flat.sort().values.unsqueeze(0)
    ps = torch.tensor(sorted(set(float(p) for p in percentiles) | {1.0}), device=flat.device)
    candidates = torch.cat([_quantiles_of_sorted(sorted_flat, ps)[:, 0], flat.new_tensor([1.0])])
    candidates = candidates.clamp(min=_MIN_SCALE)
    errors = torch.stack([
        (log2_dequantize(log2_quantize(flat, d, bits), d, bits) - flat).pow(2).mean() for d in candidates
    ])
    return candidates[int(errors.argmin())]
