"""Gaussian-noise baseline [PSAQ mode 1]: x ~ N(0, 1) in the model's normalized input space."""
from __future__ import annotations

import torch

from .base import SyntheticSet, register_synth


@register_synth("gaussian")
def gaussian_images(qmodel, num_images: int = 32, seed: int = 0, config=None, progress: bool = True) -> SyntheticSet:
    spec = qmodel.input_spec
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, spec.channels, spec.height, spec.width, generator=generator)
    return SyntheticSet(images=images, targets=None, method="gaussian", seed=seed)
