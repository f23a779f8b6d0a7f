"""Which models the engine runs, decided from their structure alone.

No calibrated value is read, so ``dfqvit.compile`` asks before its calibration (minutes on a GPU, longer on a
CPU) and a backend that cannot run the model fails at once instead of after it. ``QuantizedViT`` asks the
same question of the calibrated model, so the two can never disagree. What depends on the calibration
(per-tensor grids, activation quantizers on or off together) is checked when the engine is built.
"""
from __future__ import annotations

from typing import Dict, List

from torch import nn

from dfqvit.errors import UnsupportedModelError
from dfqvit.models.base import PRE_NORM_BLOCKS

# What the engine does not implement, said once however many blocks have it.
DYNAMIC_MASK = "dynamic_mask=True (the engine uses each block's precomputed attn_mask)"
NOT_ERF_GELU = ("an MLP other than timm's Mlp with the exact (erf) GELU the engine fuses (a gated MLP, another "
                "activation, or a norm inside the MLP)")
NOT_PRE_NORM_BLOCK = "a block other than timm's pre-norm Block / SwinTransformerBlock"
NOT_LAYER_NORM = "a norm other than LayerNorm before a quantized layer (the engine fuses LayerNorm + quantize)"
PATCH_CONV = ("a quantized patch-embedding conv other than stride = kernel, no padding, dilation 1, groups 1 "
              "(keep it float: QuantConfig(quantize_patch_embed=False))")


def _patch_conv_is_gemm(proj: nn.Module) -> bool:
    """A quantized patch embedding runs as one GEMM over flattened, non-overlapping patches."""
    return (tuple(proj.stride) == tuple(proj.kernel_size) and tuple(proj.padding) == (0, 0)
            and tuple(proj.dilation) == (1, 1) and proj.groups == 1)


def _is_erf_gelu(act: nn.Module) -> bool:
    from timm.layers.activations import GELU  # timm's act_layer="gelu": F.gelu, the same erf GELU

    return (type(act) is nn.GELU and act.approximate == "none") or type(act) is GELU


def _is_erf_gelu_mlp(mlp: nn.Module) -> bool:
    """timm's plain ``Mlp`` (fc1, GELU, fc2): a gated one (GluMlp, GatedMlp) splits or gates fc1's output."""
    from timm.layers import Mlp

    return type(mlp) is Mlp and _is_erf_gelu(mlp.act) and isinstance(mlp.norm, nn.Identity)


def _fused_norms(model: nn.Module, blocks) -> List[nn.Module]:
    """The norms whose output the engine quantizes in one fused LayerNorm+quantize kernel (with activations
    quantized): each block's norm1 / norm2 and Swin's patch-merging norms."""
    from timm.models.swin_transformer import PatchMerging

    norms = [norm for block in blocks for norm in (block.norm1, block.norm2)]
    return norms + [m.norm for m in model.modules() if isinstance(m, PatchMerging)]


def check_engine_support(model: nn.Module, config) -> None:
    """Raise ``UnsupportedModelError`` naming every part of ``model`` (a timm ViT / DeiT / Swin, float or
    wrapped by dfqvit) that the integer engine does not implement under ``config`` (a ``QuantConfig``: whether
    the patch-embedding conv and the activations are quantized)."""
    from dfqvit.models.base import find_adapter

    from .model import TRUNKS  # here: model.py imports this module

    adapter = find_adapter(model)
    if adapter.name not in TRUNKS:
        raise UnsupportedModelError(f"no engine for model family {adapter.name!r}; supported: {sorted(TRUNKS)}")
    found: Dict[str, List[str]] = {}  # what -> where (module names; empty for the model as a whole)

    def flag(what: str, where: str = "") -> None:
        found.setdefault(what, []).extend([where] if where else [])

    if getattr(model, "dynamic_img_size", False):
        flag("dynamic_img_size=True (the engine runs a fixed input size)")
    if getattr(model, "absolute_pos_embed", None) is not None:
        flag("a Swin absolute position embedding")
    if getattr(model.patch_embed, "dynamic_img_pad", False):
        flag("dynamic_img_pad=True", "patch_embed")
    if config.quantize_patch_embed and not _patch_conv_is_gemm(model.patch_embed.proj):
        flag(PATCH_CONV, "patch_embed.proj")
    names = {id(module): name for name, module in model.named_modules()}
    for block in adapter.blocks(model):
        where = names[id(block)]
        if getattr(block, "dynamic_mask", False):
            flag(DYNAMIC_MASK, where)
        if type(block) not in PRE_NORM_BLOCKS:  # ResPostBlock ran as pre-norm (cosine 0.32 to fp32)
            flag(f"{NOT_PRE_NORM_BLOCK} ({type(block).__name__})", where)
        elif not _is_erf_gelu_mlp(block.mlp):
            mlp = block.mlp
            flag(f"{NOT_ERF_GELU} ({type(mlp).__name__}: act={getattr(mlp, 'act', None)!r}, "
                 f"norm={getattr(mlp, 'norm', None)!r})", f"{where}.mlp")
    if config.quantize_activations:
        for norm in _fused_norms(model, adapter.blocks(model)):
            if not isinstance(norm, nn.LayerNorm):
                flag(f"{NOT_LAYER_NORM} ({type(norm).__name__})", names[id(norm)])
    if found:
        parts = [what + (f" at {', '.join(where)}" if where else "") for what, where in found.items()]
        raise UnsupportedModelError("the integer engine does not implement " + "; ".join(parts)
                                    + ". backend='fake' runs it as the fake-quant model")
