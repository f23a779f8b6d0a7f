"""Adapter for timm ``SwinTransformer``: window attention with relative-position bias, shifted-window
masks, patch merging (its ``reduction`` Linear is quantized) and the ``head.fc`` classifier."""
from __future__ import annotations

from typing import List, Optional

from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import nn

from dfqvit.config import QuantConfig
from dfqvit.errors import UnsupportedModelError
from dfqvit.nn import QuantWindowAttention

from .base import Adapter, register_adapter


@register_adapter
class SwinAdapter(Adapter):
    name = "swin"
    model_types = (SwinTransformer,)

    def check(self, model: nn.Module) -> None:
        for i, block in enumerate(self.blocks(model)):
            if type(block.attn) is not WindowAttention:
                raise UnsupportedModelError(
                    f"Swin block {i} has attention {type(block.attn).__name__}; only timm WindowAttention is supported")

    def convert(self, module: nn.Module, fqn: str, config: QuantConfig) -> Optional[nn.Module]:
        if type(module) is WindowAttention:
            return QuantWindowAttention(module, config)
        return None

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        return [block for stage in model.layers for block in stage.blocks]

    def head_names(self, model: nn.Module):
        return ["head.fc"] if isinstance(getattr(model.head, "fc", None), nn.Linear) else []
