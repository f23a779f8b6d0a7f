"""Adapter for timm ``VisionTransformer``: ViT, DeiT, DeiT-distilled (two prefix tokens, two heads)
and ``class_token=False`` models with average pooling."""
from __future__ import annotations

from typing import List, Optional

from timm.layers import Attention, PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dfqvit.config import QuantConfig
from dfqvit.errors import UnsupportedModelError
from dfqvit.nn import QuantAttention

from .base import Adapter, register_adapter


@register_adapter
class ViTAdapter(Adapter):
    name = "vit"
    model_types = (VisionTransformer,)

    def check(self, model: nn.Module) -> None:
        problems = []
        if getattr(model, "attn_pool", None) is not None:
            problems.append(f"global_pool={model.global_pool!r} (attention pooling head)")
        if type(model.patch_embed) is not PatchEmbed:
            problems.append(f"patch embedding {type(model.patch_embed).__name__} (only PatchEmbed)")
        for i, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if type(attn) is not Attention:
                problems.append(f"blocks.{i}.attn is {type(attn).__name__} (only timm Attention)")
                continue
            if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
                problems.append(f"blocks.{i}.attn uses qk_norm")
            if not isinstance(attn.norm, nn.Identity):
                problems.append(f"blocks.{i}.attn uses scale_norm")
            if getattr(attn, "gate", None) is not None:
                problems.append(f"blocks.{i}.attn is gated")
        if problems:
            raise UnsupportedModelError(
                "this VisionTransformer uses variants dfqvit does not quantize: " + "; ".join(problems)
                + ". Supported: plain ViT/DeiT attention with token or average pooling")

    def convert(self, module: nn.Module, fqn: str, config: QuantConfig) -> Optional[nn.Module]:
        if type(module) is Attention:
            return QuantAttention(module, config)
        return None

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        return list(model.blocks)

    def head_names(self, model: nn.Module):
        return [name for name in ("head", "head_dist") if isinstance(getattr(model, name, None), nn.Linear)]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)
