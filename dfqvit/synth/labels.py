"""Learning targets: classes per image and SPDFQ's soft labels (§3.3.3, eq. 12; METHODS §2.8).

Z ~ U(0, 1)^C; the target classes get Z[c] ~ U(eps1, eps2); the target is softmax(Z). A full image
targets all of its classes (one per MSR crop), each crop only its own. Without SL the targets are
one-hot (eq. 3), the full image on its first class.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, Tuple

import torch

# Pitfall 8: eps shift that gives a C-class model the target mass of the paper's 1000 classes.
PAPER_NUM_CLASSES = 1000


@dataclasses.dataclass
class LabelPlan:
    """classes[b]: image b's distinct target classes. image_targets: (B, C) rows summing to 1.
    crop_targets: (n, C) for the crops of a CropPlan. main: (B,) the largest class of each image."""

    classes: List[List[int]]
    image_targets: torch.Tensor
    crop_targets: torch.Tensor
    main: torch.Tensor


def class_aware_eps(eps: Tuple[float, float], num_classes: int) -> Tuple[float, float]:
    """(eps1, eps2) - ln((1000 - 1) / (C - 1)): the same softmax mass on the target as at 1000 classes."""
    shift = math.log((PAPER_NUM_CLASSES - 1) / max(num_classes - 1, 1))
    return eps[0] - shift, eps[1] - shift


def draw_classes(classes_per_image: Sequence[int], num_classes: int, generator: torch.Generator) -> List[List[int]]:
    """Distinct, uniform classes per image."""
    return [torch.randperm(num_classes, generator=generator)[:m].tolist() for m in classes_per_image]


def soft_target(targets: Sequence[int], num_classes: int, eps: Tuple[float, float],
                generator: torch.Generator) -> torch.Tensor:
    """Eq. 12: softmax(Z) with Z ~ U(0, 1)^C and Z[targets] ~ U(eps1, eps2)."""
    z = torch.rand(num_classes, generator=generator)
    z[list(targets)] = eps[0] + (eps[1] - eps[0]) * torch.rand(len(targets), generator=generator)
    return z.softmax(-1)


def one_hot(target: int, num_classes: int) -> torch.Tensor:
    t = torch.zeros(num_classes)
    t[target] = 1.0
    return t


def draw_labels(classes: List[List[int]], crop_image: Sequence[int], crop_slot: Sequence[int], num_classes: int,
                eps: Tuple[float, float], soft: bool, generator: torch.Generator) -> LabelPlan:
    """Targets for the full images and for the crops (crop i carries classes[crop_image[i]][crop_slot[i]])."""
    if soft:
        images = [soft_target(c, num_classes, eps, generator) for c in classes]
        crops = [soft_target([classes[b][s]], num_classes, eps, generator) for b, s in zip(crop_image, crop_slot)]
    else:
        images = [one_hot(c[0], num_classes) for c in classes]
        crops = [one_hot(classes[b][s], num_classes) for b, s in zip(crop_image, crop_slot)]
    image_targets = torch.stack(images)
    crop_targets = torch.stack(crops) if crops else image_targets.new_zeros(0, num_classes)
    return LabelPlan(classes=classes, image_targets=image_targets, crop_targets=crop_targets,
                     main=image_targets.argmax(-1))
