"""Turn whatever the user passed as ``calib=`` into a tensor of normalized calibration images."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Tuple

import torch

from dfqvit.data import images_and_labels, is_image_batch
from dfqvit.errors import CalibrationError, InputShapeError, warn_user
from dfqvit.models import QuantizedModel, validate_images
from dfqvit.synth import SyntheticSet, synthesize
from dfqvit.synth.base import quant_settings


IMAGE_KEYS = ("pixel_values", "image", "images")  # where a dict batch keeps its images


def _take_images(batches: Iterable, limit: int) -> torch.Tensor:
    images, count = [], 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, dict):  # Hugging Face style batches
            key = next((k for k in IMAGE_KEYS if k in x), None)
            if key is None:
                raise CalibrationError(f"calibration loader yielded a dict with keys {sorted(x)}; dfqvit reads the "
                                       f"images from one of {IMAGE_KEYS}")
            x = x[key]
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(
                f"calibration loader yielded {type(x).__name__}; it must yield image tensors (B, C, H, W) or "
                "(C, H, W), (images, labels), or dicts with 'pixel_values' / 'image' (PIL images need "
                "torchvision's ToTensor() and Normalize(mean, std) transforms)")
        if x.dim() == 3:  # a Dataset of single images rather than a DataLoader of batches
            x = x.unsqueeze(0)
        images.append(x)
        count += x.shape[0]
        if count >= limit:
            break
    if not images:
        raise CalibrationError("calibration loader yielded no images")
    shapes = sorted({tuple(x.shape[1:]) for x in images})
    if len(shapes) > 1:  # torch.cat's "Sizes of tensors must match"
        raise InputShapeError(f"calibration images of different sizes {shapes[:4]}; resize them all to the model's "
                              "input size (e.g. torchvision Resize + CenterCrop)")
    return torch.cat(images)[:limit]


def _check_set_normalization(images: SyntheticSet, spec) -> None:
    """A set synthesized for another mean / std holds images of another input space (it was used silently)."""
    made = images.config.get("normalization") if isinstance(images.config, dict) else None
    if not made:
        return  # real images, or a set saved before sets recorded it
    mean, std = tuple(made.get("mean", ())), tuple(made.get("std", ()))
    if len(mean) != len(spec.mean) or any(abs(a - b) > 1e-6 for a, b in zip(mean + std, spec.mean + spec.std)):
        raise CalibrationError(f"these {images.method} images were made for inputs normalized with mean {mean}, std "
                               f"{std}, but this model takes mean {spec.mean}, std {spec.std}; synthesize them for "
                               "this model (or give the normalization they were made for)")


def _warn_other_quant_settings(images: SyntheticSet, qmodel: QuantizedModel) -> None:
    """A psaq_v2 / dfqvit set was made against a quantized model of some bit width (its student / adversary); used
    for another one it calibrates that model with images aimed at other quantization errors, which said nothing."""
    made = images.config.get("quant") if isinstance(images.config, dict) else None
    now = quant_settings(qmodel.config)
    if made and made != now:
        fields = [k for k in sorted(set(made) | set(now)) if made.get(k) != now.get(k)]
        warn_user(f"dfqvit: these {images.method} images were made against a model quantized with "
                  f"{_fields(made, fields)}, and this one has {_fields(now, fields)}; synthesize them for it (calib="
                  f"{images.method!r}, --calib {images.method}) to calibrate with images aimed at its errors")


def _fields(quant: dict, fields) -> str:
    return ", ".join(f"{k}={quant.get(k)!r}" for k in fields)


def _check_set(images: SyntheticSet, qmodel: QuantizedModel) -> None:
    """A set for ``qmodel``: its normalization (refused if another), its quantization settings (a warning)."""
    _check_set_normalization(images, qmodel.input_spec)
    _warn_other_quant_settings(images, qmodel)


def set_images(images, qmodel: QuantizedModel) -> Tuple[torch.Tensor, bool]:
    """(the image tensor, whether it runs easy -> hard) of what a stage function was given: a tensor (not ordered),
    or a SyntheticSet, checked against ``qmodel`` as ``compile`` checks it."""
    if isinstance(images, SyntheticSet):
        _check_set(images, qmodel)
        return images.images, images.ordered_easy_to_hard
    return images, False


def calibration_images(calib, qmodel: QuantizedModel, num_images: int, seed: int = 0,
                       progress: bool = True, synth_config=None, as_set: bool = False):
    """``calib`` may be a method name (see ``dfqvit.synth.available_methods()``), a SyntheticSet,
    an image tensor (B, C, H, W) or an iterable of batches (a DataLoader).

    Returns the first ``num_images`` images as a float tensor, or with ``as_set`` a SyntheticSet (real
    images get ``method="images"`` and no targets). ``synth_config`` goes to the synthesis method.
    """
    if isinstance(calib, str):
        found = synthesize(calib, qmodel, num_images=num_images, seed=seed, config=synth_config, progress=progress)
    elif isinstance(calib, SyntheticSet):
        _check_set(calib, qmodel)
        found = calib
    elif isinstance(calib, torch.Tensor) or is_image_batch(calib):  # an array was read as batches of one image
        found = SyntheticSet(images=torch.as_tensor(calib), targets=None, method="images", seed=seed)
    elif (pair := images_and_labels(calib)) is not None:  # one (images, labels) batch: it was read as two batches
        found = SyntheticSet(images=pair[0], targets=None, method="images", seed=seed)
    elif isinstance(calib, torch.utils.data.Dataset) and not isinstance(calib, torch.utils.data.IterableDataset) \
            and hasattr(calib, "__len__") and hasattr(calib, "__getitem__"):
        # a map-style Dataset (dfqvit.data.load_images, TensorDataset) has no __iter__: it was refused
        items = (calib[i] for i in range(len(calib)))
        found = SyntheticSet(images=_take_images(items, num_images), targets=None, method="images", seed=seed)
    elif isinstance(calib, Iterable):
        found = SyntheticSet(images=_take_images(calib, num_images), targets=None, method="images", seed=seed)
    else:
        raise CalibrationError(
            f"calib={type(calib).__name__} is not usable; give a method name, an image tensor, a SyntheticSet, "
            f"a Dataset or a DataLoader")
    images = found.images
    validate_images(images, qmodel.input_spec, what="calibration images")
    if images.shape[0] == 0:
        raise CalibrationError("calibration set is empty")
    if not as_set:
        return images[:num_images].float()
    targets = None if found.targets is None else found.targets[:num_images]
    return dataclasses.replace(found, images=images[:num_images].float(), targets=targets)
