"""Multi-semantic reinforcement (SPDFQ §3.3.2, eq. 11; METHODS §2.7).

Each image gets m non-overlapping boxes, each cropped and resized (bilinear) to the input size and
fed as an extra image with its own class. A crop is a slice of the image parameter, so its loss
reaches only its box. [PROPOSED] layout: the boxes are m distinct cells of a g x g grid, g = 2 (S/2 x S/2
cells) for K_MSR <= 4 and 3 for K_MSR > 4, drawn once and fixed for the run.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """Crops of a batch, ordered by cell so crops of one cell are resized together.

    image_index: (n,) source image of each crop. boxes: (n, 4) top, left, height, width.
    slot: (n,) which of its image's classes (0..m-1) the crop carries."""

    image_index: torch.Tensor
    boxes: torch.Tensor
    slot: torch.Tensor

    def __len__(self) -> int:
        return int(self.image_index.numel())


def grid_cells(height: int, width: int, k_msr: int) -> List[Tuple[int, int, int, int]]:
    """Boxes (top, left, height, width) of the g x g grid that holds K_MSR non-overlapping crops: METHODS §2.7
    "m distinct cells of a 2x2 grid (S/2 x S/2; a 3x3 grid if K_MSR > 4)". At least 2 x 2: with K_MSR = 1 a 1 x 1
    grid made the crop the whole image (the full image again, with the same class)."""
    g = max(2, math.ceil(math.sqrt(k_msr)))
    rows = [round(i * height / g) for i in range(g + 1)]
    cols = [round(j * width / g) for j in range(g + 1)]
    return [(rows[i], cols[j], rows[i + 1] - rows[i], cols[j + 1] - cols[j]) for i in range(g) for j in range(g)]


def draw_crop_plan(crops_per_image: Sequence[int], height: int, width: int, k_msr: int,
                   generator: torch.Generator) -> CropPlan:
    """For image b, ``crops_per_image[b]`` distinct grid cells (no two crops of an image overlap)."""
    cells = grid_cells(height, width, k_msr)
    chosen = []  # (cell, image, slot)
    for image, m in enumerate(crops_per_image):
        picks = torch.randperm(len(cells), generator=generator)[:m].tolist()
        chosen.extend((cell, image, slot) for slot, cell in enumerate(picks))
    chosen.sort()
    return CropPlan(image_index=torch.tensor([c[1] for c in chosen], dtype=torch.int64),
                    boxes=torch.tensor([cells[c[0]] for c in chosen], dtype=torch.int64).view(-1, 4),
                    slot=torch.tensor([c[2] for c in chosen], dtype=torch.int64))


def crop_and_resize(images: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """Eq. 11: (B, C, H, W) -> (n, C, H, W) crops in plan order, one interpolate per distinct box."""
    if len(plan) == 0:
        return images[:0]
    size = images.shape[-2:]
    boxes = plan.boxes.tolist()
    index = plan.image_index.to(images.device)
    out, start = [], 0
    while start < len(boxes):
        end = start
        while end < len(boxes) and boxes[end] == boxes[start]:
            end += 1
        top, left, h, w = boxes[start]
        patch = images[index[start:end], :, top:top + h, left:left + w]
        out.append(F.interpolate(patch, size=size, mode="bilinear", align_corners=False))
        start = end
    return torch.cat(out)
