"""What synthesis needs to know about a model, found with one probe forward of a single image:
class count, and per attention module the (windows, heads, tokens) of its maps for one image."""
from __future__ import annotations

import dataclasses
from typing import Tuple

import torch

from dfqvit.errors import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """One attention module, per image: ``windows`` maps (1 for ViT/DeiT, nW for Swin) of
    ``heads`` x ``tokens`` x ``tokens``."""

    windows: int
    heads: int
    tokens: int


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    family: str
    num_classes: int
    num_prefix_tokens: int
    attention: Tuple[AttentionShape, ...]   # model order = block order (one attention per block)
    image_shape: Tuple[int, int, int]       # (C, H, W)

    @property
    def depth(self) -> int:
        return len(self.attention)

    @property
    def uses_class_token(self) -> bool:
        """APA reads the class-token row; without prefix tokens (Swin, class_token=False) it reads
        the mean over queries (SPDFQ §3.3.1)."""
        return self.num_prefix_tokens > 0

    @property
    def aspect(self) -> float:
        return self.image_shape[1] / self.image_shape[2]


def model_device(qmodel) -> torch.device:
    for p in qmodel.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def probe_layout(qmodel) -> ModelLayout:
    spec = qmodel.input_spec
    image = torch.zeros(1, spec.channels, spec.height, spec.width, device=model_device(qmodel))
    with qmodel.quant_state(False, False), qmodel.record_attention(probs=True) as taps:
        logits = qmodel.model(image)
        shapes = tuple(AttentionShape(windows=t.probs.shape[0], heads=t.probs.shape[1], tokens=t.probs.shape[2])
                       for t in taps)
    if logits.dim() != 2 or getattr(qmodel.model, "num_classes", 1) == 0:
        raise UnsupportedModelError(
            f"synthesis needs a classifier returning (B, classes) logits; the model returned shape "
            f"{tuple(logits.shape)} (build it with num_classes > 0)")
    if not shapes:
        raise UnsupportedModelError("the model has no attention module dfqvit can tap; synthesis needs one")
    return ModelLayout(family=qmodel.family, num_classes=int(logits.shape[1]),
                       num_prefix_tokens=int(qmodel.num_prefix_tokens), attention=shapes,
                       image_shape=(spec.channels, spec.height, spec.width))
