"""Top-1 accuracy and agreement between two models, with a progress bar."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from tqdm.auto import tqdm

from dfqvit.errors import DFQViTError


@dataclasses.dataclass(frozen=True)
class EvalResult:
    top1: float              # percent
    images: int
    agreement: Optional[float] = None  # percent of images where top-1 matches the reference model


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 128, reference=None, device="cpu", progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Top-1 of ``model`` on ``dataset``; with ``reference``, also its top-1 agreement with it."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DFQViTError(f"batch size {batch_size!r}: it must be an int >= 1 (--batch-size)")
    if len(dataset) == 0:
        raise DFQViTError("the evaluation data holds no images")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct = agree = total = 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        pred = model(x).argmax(dim=-1)
        correct += int((pred == y).sum())
        if reference is not None:
            agree += int((pred == reference(x).argmax(dim=-1)).sum())
        total += y.numel()
    return EvalResult(top1=100.0 * correct / max(total, 1), images=total,
                      agreement=100.0 * agree / max(total, 1) if reference is not None else None)
