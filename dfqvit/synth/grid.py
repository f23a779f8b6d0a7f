"""A labelled PNG grid of a SyntheticSet, so a person can look at the images.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .base import SyntheticSet

MAX_COLUMNS = 8
CELL_INCHES = 1.6


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalized (B, C, H, W) -> pixels in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)


def image_label(index: int, target: Optional[int], class_names: Optional[Sequence[str]]) -> str:
    if target is None:
        return f"#{index}"
    if class_names is not None and 0 <= target < len(class_names):
        return f"#{index}: {class_names[target]}"
    return f"#{index}: class {target}"


def save_grid(synthetic_set: SyntheticSet, path: str, mean: Sequence[float], std: Sequence[float],
              class_names: Optional[Sequence[str]] = None) -> None:
    """Write the images of ``synthetic_set`` as a PNG grid titled with index and main class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pixels = denormalize(synthetic_set.images.detach().float().cpu(), mean, std)
    count = pixels.shape[0]
    cols = min(MAX_COLUMNS, max(1, math.ceil(math.sqrt(count))))
    rows = max(1, math.ceil(count / cols))
    fig = Figure(figsize=(cols * CELL_INCHES, rows * CELL_INCHES + 0.4))
    FigureCanvasAgg(fig)
    fig.suptitle(f"{synthetic_set.method} (seed {synthetic_set.seed}, {count} images)", fontsize=9)
    targets = synthetic_set.targets
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i >= count:
            continue
        image = pixels[i].permute(1, 2, 0).numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                  interpolation="nearest")
        target = None if targets is None else int(targets[i])
        ax.set_title(image_label(i, target, class_names), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
