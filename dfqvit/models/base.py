"""Adapter registry: each timm family says how to swap its modules and where its blocks, heads,
prefix tokens and input size are. Matching is by ``isinstance`` against timm classes, never by
module-name substrings; the original model is never modified (adapters work on a deep copy)."""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple, Type

from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from dfqvit.config import QuantConfig
from dfqvit.errors import UnsupportedModelError
from dfqvit.nn import QuantConv2d, QuantLinear

# timm's pre-norm blocks (x + attn(norm1(x)); x + mlp(norm2(x))): norm1 feeds only attn.qkv, norm2 only mlp.fc1.
# Others run other math on the same parameters (ResPostBlock normalises after the branch, parallel blocks add
# branches side by side): the post-LayerNorm fold and the integer engine take these two only.
PRE_NORM_BLOCKS = (Block, SwinTransformerBlock)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the model expects: (channels, height, width) and the normalization of its input space."""

    channels: int
    height: int
    width: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    strict_size: bool = True
    size_multiple: Tuple[int, int] = (1, 1)  # without strict_size: H, W must be multiples (the patch size)


class Adapter:
    """One timm model family. Subclasses fill in the family-specific answers."""

    name: str = "base"
    model_types: Tuple[Type[nn.Module], ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_types)

    def check(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError naming any variant the quantized modules do not implement."""

    def convert(self, module: nn.Module, fqn: str, config: QuantConfig) -> Optional[nn.Module]:
        """Quantized replacement for ``module`` or None to descend into it."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        raise NotImplementedError

    def head_names(self, model: nn.Module) -> Sequence[str]:
        raise NotImplementedError

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def patch_embed_name(self) -> str:
        return "patch_embed.proj"

    def input_spec(self, model: nn.Module) -> InputSpec:
        pe = model.patch_embed
        height, width = pe.img_size
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return InputSpec(
            channels=pe.proj.in_channels, height=height, width=width,
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
            strict_size=bool(getattr(pe, "strict_img_size", True)) and not getattr(model, "dynamic_img_size", False),
            size_multiple=(1, 1) if getattr(pe, "dynamic_img_pad", False) else tuple(pe.patch_size))

    # -- shared swapping logic ------------------------------------------------------------------------

    def convert_common(self, module: nn.Module, fqn: str, config: QuantConfig, heads: Sequence[str],
                       skipped: List[str]) -> Optional[nn.Module]:
        """Linear / patch-embed conv rules shared by every family."""
        if isinstance(module, nn.Linear):
            if fqn in heads and not config.quantize_head:
                skipped.append(fqn)
                return module
            return QuantLinear(module, config)
        if isinstance(module, nn.Conv2d):
            if fqn != self.patch_embed_name():
                raise UnsupportedModelError(f"unexpected Conv2d at {fqn!r}; only the patch embedding may be a conv")
            if not config.quantize_patch_embed:
                skipped.append(fqn)
                return module
            return QuantConv2d(module, config)
        return None

    def swap(self, model: nn.Module, config: QuantConfig) -> List[str]:
        """Replace every quantizable module of ``model`` in place; returns the fqns kept in float."""
        skipped: List[str] = []
        heads = tuple(self.head_names(model))

        def visit(parent: nn.Module, prefix: str) -> None:
            for name, child in list(parent.named_children()):
                fqn = f"{prefix}.{name}" if prefix else name
                new = self.convert(child, fqn, config)
                if new is None:
                    new = self.convert_common(child, fqn, config, heads, skipped)
                if new is None:
                    visit(child, fqn)
                elif new is not child:
                    setattr(parent, name, new)

        visit(model, "")
        return skipped


_ADAPTERS: List[Adapter] = []


def register_adapter(cls: Callable[[], Adapter]):
    """Class decorator: make a family available to :func:`find_adapter`."""
    _ADAPTERS.append(cls())
    return cls


# Wrappers around a model and the attribute that holds it: (DataParallel / DistributedDataParallel, torch.compile)
WRAPPED_MODEL_ATTRS = ("module", "_orig_mod")


def find_adapter(model: nn.Module) -> Adapter:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module (a timm model), got {type(model).__name__}")
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    for attr in WRAPPED_MODEL_ATTRS:
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and any(a.matches(inner) for a in _ADAPTERS):
            raise UnsupportedModelError(f"the model is wrapped ({type(model).__name__} around a "
                                        f"{type(inner).__name__}); pass the model itself: model.{attr}")
    supported = ", ".join(f"{a.name} ({', '.join(t.__name__ for t in a.model_types)})" for a in _ADAPTERS)
    raise UnsupportedModelError(
        f"no dfqvit adapter for {type(model).__module__}.{type(model).__name__}; supported timm families: "
        f"{supported}. Build the model with timm (e.g. timm.create_model('deit_small_patch16_224'))")
