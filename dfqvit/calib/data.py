"""Turn whatever the user passed as ``calib=`` into a tensor of normalized calibration images."""
from __future__ import annotations

from typing import Iterable

import torch

from dfqvit.errors import CalibrationError
from dfqvit.models import QuantizedModel, validate_images
from dfqvit.synth import SyntheticSet, synthesize


def _take_images(batches: Iterable, limit: int) -> torch.Tensor:
    images, count = [], 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, dict):
            x = x.get("image", x.get("images"))
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(
                f"calibration loader yielded {type(x).__name__}; it must yield image tensors or (images, labels)")
        images.append(x)
        count += x.shape[0]
        if count >= limit:
            break
    if not images:
        raise CalibrationError("calibration loader yielded no images")
    return torch.cat(images)[:limit]


def calibration_images(calib, qmodel: QuantizedModel, num_images: int, seed: int = 0,
                       progress: bool = True) -> torch.Tensor:
    """``calib`` may be a method name (see ``dfqvit.synth.available_methods()``), a SyntheticSet,
    an image tensor (B, C, H, W) or an iterable of batches (a DataLoader)."""
    if isinstance(calib, str):
        images = synthesize(calib, qmodel, num_images=num_images, seed=seed, progress=progress).images
    elif isinstance(calib, SyntheticSet):
        images = calib.images
    elif isinstance(calib, torch.Tensor):
        images = calib
    elif isinstance(calib, Iterable):
        images = _take_images(calib, num_images)
    else:
        raise CalibrationError(
            f"calib={type(calib).__name__} is not usable; give a method name, an image tensor, a SyntheticSet "
            f"or a DataLoader")
    validate_images(images, qmodel.input_spec, what="calibration images")
    if images.shape[0] == 0:
        raise CalibrationError("calibration set is empty")
    return images[:num_images].float()
