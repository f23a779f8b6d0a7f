"""Post-LayerNorm activations: channel-wise calibration, then re-parameterisation to per-tensor
(METHODS §1.4, [RepQ], used by [I&S]).

The inputs of ``qkv`` and ``fc1`` follow a LayerNorm and differ a lot between channels. They are first
calibrated with one (Δ_c, z_c) per channel, then the per-channel grids are folded into the LayerNorm
affine and the next Linear so that one per-tensor (Δ̃, z̃) quantizes the new LayerNorm output to the
same codes:

    Δ̃ = mean_c Δ_c,  z̃ = round(mean_c z_c),  r_c = Δ_c / Δ̃,  b_c = Δ̃ (z̃ − z_c)
    LayerNorm:   γ_c ← γ_c / r_c,   β_c ← β_c / r_c − b_c          (new output x'_c = x_c / r_c − b_c)
    next Linear: W[:, c] ← W[:, c] · r_c,   bias ← bias + W_new · b  (same float output)

z̃ is rounded (RepQ keeps the mean): with z_c − z̃ an integer, x'/Δ̃ + z̃ = x/Δ_c + z_c, so rounding and
clipping give exactly the per-channel codes; a fractional z̃ would shift the rounding points. Nearly constant
channels are not folded (see ``fold_into_per_tensor``).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from timm.layers import Mlp
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from dfqvit.models.base import PRE_NORM_BLOCKS
from dfqvit.nn import QuantAttentionBase, QuantLinear
from dfqvit.quant import UniformQuantizer

PostNormPair = Tuple[nn.LayerNorm, QuantLinear]

# Channels with a step below this fraction of the median step are not folded (see fold_into_per_tensor). Random
# LayerNorms span ~1/800 to 2x the median; gamma = 1e-4 gave ~1e-4 (W8A8 cosine 0.879 when folded).
FOLD_MIN_STEP = 1e-3


def _foldable(norm: nn.Module, layer: nn.Module) -> bool:
    return (isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
            and isinstance(layer, QuantLinear) and isinstance(layer.input_quantizer, UniformQuantizer)
            and layer.input_quantizer.channels is None)


def pads_windows(block: nn.Module) -> bool:
    """Whether a Swin block pads its token grid to whole windows. timm pads *after* norm1 with zeros, which qkv
    maps to its bias; folded, a zero would mean ``x'`` = 0 and qkv would give ``bias + W r b``: the padded keys and
    values would change (quantization off: 5% relative error in the logits of a 10x10-token Swin with 4x4
    windows). Such a block keeps norm1 and qkv as they are."""
    if not isinstance(block, SwinTransformerBlock):
        return False
    return any(size % window for size, window in zip(block.input_resolution, block.window_size))


def post_norm_pairs(block: nn.Module) -> List[PostNormPair]:
    """(LayerNorm, Linear that reads only its output) pairs of a block, in forward order."""
    if type(block) not in PRE_NORM_BLOCKS:
        return []
    pairs = []
    if (isinstance(block.attn, QuantAttentionBase) and _foldable(block.norm1, block.attn.qkv)
            and not pads_windows(block)):
        pairs.append((block.norm1, block.attn.qkv))
    if type(block.mlp) is Mlp and _foldable(block.norm2, block.mlp.fc1):
        pairs.append((block.norm2, block.mlp.fc1))
    return pairs


def channelwise_input_quantizer(layer: QuantLinear) -> UniformQuantizer:
    """A per-channel (last dim) version of ``layer``'s per-tensor input quantizer, same bits and search."""
    q = layer.input_quantizer
    channelwise = UniformQuantizer(q.num_bits, channels=layer.in_features, channel_dim=-1,
                                   percentiles=q.percentiles, max_elements=q.max_elements)
    channelwise.enabled = q.enabled
    return channelwise.to(q.scale.device)


@torch.no_grad()
def fold_into_per_tensor(norm: nn.LayerNorm, layer: QuantLinear, channelwise: UniformQuantizer,
                         per_tensor: UniformQuantizer) -> None:
    """Fold the calibrated ``channelwise`` grid into ``norm`` and ``layer`` and set ``per_tensor`` to
    the equivalent per-tensor grid (``layer.input_quantizer`` is left to the caller)."""
    delta_c, zero_c = channelwise.scale.double(), channelwise.zero_point.double()
    # A nearly constant channel (a LayerNorm gamma near 0 with beta != 0) gets a tiny step and a zero point far
    # outside the codes (-1e6 for gamma = 0): folded, its shift b_c reached ~2e4, which the next layer's bias cancels
    # in float but its quantized weights' rounding errors did not (cosine -0.41 at W8A8). Channels whose step is
    # under FOLD_MIN_STEP of the median are left as they are (r_c = 1, b_c = 0) and quantized with the per-tensor
    # grid; z~ is the others' mean.
    folded = delta_c >= FOLD_MIN_STEP * delta_c.median()
    delta = delta_c[folded].mean()
    zero = torch.round(zero_c[folded].mean())
    r = torch.where(folded, delta_c / delta, torch.ones_like(delta_c))
    b = torch.where(folded, delta * (zero - zero_c), torch.zeros_like(delta_c))
    norm.weight.copy_((norm.weight.double() / r).to(norm.weight.dtype))
    norm.bias.copy_((norm.bias.double() / r - b).to(norm.bias.dtype))
    new_weight = layer.weight.double() * r
    shift = new_weight @ b
    layer.weight.copy_(new_weight.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                              device=layer.weight.device), requires_grad=False)
    layer.bias.copy_((layer.bias.double() + shift).to(layer.bias.dtype))
    per_tensor.scale.copy_(delta.to(per_tensor.scale.dtype))
    per_tensor.zero_point.copy_(zero.to(per_tensor.zero_point.dtype))
    per_tensor.initialized.fill_(True)
