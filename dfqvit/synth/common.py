"""Pieces every optimised synthesis method shares: argument checks, batching, Gaussian start,
the per-batch result and the plain-dict record stored in the SyntheticSet."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch

from dfqvit.config import SynthConfig, config_to_dict
from dfqvit.errors import CalibrationError

from .losses import tv_target_scale


@dataclasses.dataclass
class BatchResult:
    """One optimised batch: images (n, C, H, W), main target per image (n,), the loss history
    (term -> one float per step) and the targets each image was optimised for (n, classes)."""

    images: torch.Tensor
    main: torch.Tensor
    history: Dict[str, List[float]]
    targets: Optional[torch.Tensor] = None


def resolve_config(config: Optional[SynthConfig]) -> SynthConfig:
    if config is None:
        return SynthConfig()
    if not isinstance(config, SynthConfig):
        raise CalibrationError(f"config must be a dfqvit.config.SynthConfig or None, got {type(config).__name__}")
    return config


def check_num_images(num_images) -> int:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise CalibrationError(f"num_images={num_images!r}: give an int >= 1 (SPDFQ uses 32)")
    return num_images


def batch_sizes(num_images: int, batch_size: Optional[int]) -> List[int]:
    """Sizes of the batches optimised one after the other (one batch when batch_size is None)."""
    size = num_images if batch_size is None else min(batch_size, num_images)
    full, rest = divmod(num_images, size)
    return [size] * full + ([rest] if rest else [])


def gaussian_init(num_images: int, spec, generator: torch.Generator, device) -> torch.Tensor:
    """SPDFQ §4.1 / [PSAQ]: standard Gaussian noise in the normalized input space."""
    shape = (num_images, spec.channels, spec.height, spec.width)
    return torch.randn(shape, generator=generator).to(device)


def draw_tv_target(config: SynthConfig, num_images: int, height: int, width: int,
                   generator: torch.Generator) -> float:
    """[PSAQ] v ~ U(tv_target), drawn once per batch and rescaled to this batch and image size."""
    lo, hi = config.tv_target
    v = lo + (hi - lo) * float(torch.rand(1, generator=generator, dtype=torch.float64))
    return v * tv_target_scale(num_images, height, width)


def loss_summary(history: Dict[str, List[float]]) -> Dict[str, List[float]]:
    """First and last value of every loss term (kept in the set's record)."""
    return {name: [values[0], values[-1]] for name, values in history.items() if values}


def set_record(config: SynthConfig, **resolved: Any) -> Dict[str, Any]:
    """The SyntheticSet's config: ``config_to_dict(config)`` plus the values resolved for this model
    under "resolved" (lr, alpha1, classes, ...)."""
    record = config_to_dict(config)
    record["resolved"] = resolved
    return record
