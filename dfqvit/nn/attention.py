"""Quantized attention that replaces timm's ``Attention`` (ViT/DeiT) and ``WindowAttention`` (Swin).

Every matmul is quantizable (METHODS §1.5): qkv and proj are QuantLinear; q and k get layer-wise
uniform quantizers before q @ kᵀ (the 1/sqrt(d) scale is applied to the integer product afterwards,
which gives the same codes as quantizing the pre-scaled q); the softmax output gets the log2 (or
uniform) quantizer and v a uniform one before attn @ v. Softmax, biases and masks stay float.

When no activation quantizer is on and nobody asked for the attention maps, the module runs
``F.scaled_dot_product_attention`` (the fast path); asking for a tap forces the explicit path.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfqvit.config import QuantConfig, SoftmaxQuantizer
from dfqvit.quant import Log2Quantizer, UniformQuantizer

from .linear import QuantLinear, make_input_quantizer


@dataclasses.dataclass
class AttentionTap:
    """What one attention module computed in the latest forward (kept with autograd history).

    probs: post-softmax probabilities before quantization, (B, H, N, N); for Swin B = images x windows.
    context: attn @ v before the head merge, (B, H, N, head_dim) (PSAQ's patch-similarity tap).
    """

    keep_probs: bool = True
    keep_context: bool = False
    probs: Optional[torch.Tensor] = None
    context: Optional[torch.Tensor] = None


def make_softmax_quantizer(config: QuantConfig):
    if not config.quantize_activations:
        return None
    if config.softmax_quantizer == SoftmaxQuantizer.LOG2:
        return Log2Quantizer(config.a_bits, percentiles=config.act_percentiles,
                             max_elements=config.search_max_elements)
    return UniformQuantizer(config.a_bits, percentiles=config.act_percentiles,
                            max_elements=config.search_max_elements)


def _apply(quantizer, x):
    return x if quantizer is None else quantizer(x)


class QuantAttentionBase(nn.Module):
    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, scale: float,
                 attn_drop: nn.Module, proj_drop: nn.Module, config: QuantConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.attn_dim = num_heads * head_dim
        self.qkv = QuantLinear(qkv, config)
        self.proj = QuantLinear(proj, config)
        self.attn_drop, self.proj_drop = attn_drop, proj_drop
        self.q_quantizer = make_input_quantizer(config)
        self.k_quantizer = make_input_quantizer(config)
        self.v_quantizer = make_input_quantizer(config)
        self.attn_quantizer = make_softmax_quantizer(config)
        self.tap: Optional[AttentionTap] = None

    def _matmul_quantizers(self):
        return (self.q_quantizer, self.k_quantizer, self.v_quantizer, self.attn_quantizer)

    def _needs_explicit_path(self) -> bool:
        return self.tap is not None or any(q is not None and q.enabled for q in self._matmul_quantizers())

    def split_heads(self, x: torch.Tensor):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def attend(self, q, k, v, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, H, N, d) x3 -> (B, N, H*d); ``bias`` is added to the scores before softmax."""
        B, _, N, _ = q.shape
        if not self._needs_explicit_path():
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        else:
            scores = (_apply(self.q_quantizer, q) @ _apply(self.k_quantizer, k).transpose(-2, -1)) * self.scale
            if bias is not None:
                scores = scores + bias
            probs = scores.softmax(dim=-1)
            probs_q = _apply(self.attn_quantizer, self.attn_drop(probs))
            x = probs_q @ _apply(self.v_quantizer, v)
            if self.tap is not None:
                self.tap.probs = probs if self.tap.keep_probs else None
                self.tap.context = x if self.tap.keep_context else None
        return x.transpose(1, 2).reshape(B, N, self.attn_dim)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(x))


class QuantAttention(QuantAttentionBase):
    """Replacement for ``timm.layers.Attention`` (ViT, DeiT, DeiT-distilled)."""

    def __init__(self, attn: nn.Module, config: QuantConfig):
        super().__init__(attn.qkv, attn.proj, attn.num_heads, attn.head_dim, attn.scale,
                         attn.attn_drop, attn.proj_drop, config)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            from dfqvit.errors import UnsupportedModelError
            raise UnsupportedModelError(
                "QuantAttention got an attention mask / is_causal; classification ViTs use neither, "
                "and masked attention is not implemented")
        q, k, v = self.split_heads(x)
        return self.output(self.attend(q, k, v, None))


class QuantWindowAttention(QuantAttentionBase):
    """Replacement for ``timm.models.swin_transformer.WindowAttention``: adds the relative-position
    bias and, in shifted blocks, the window mask (-100, not -inf) before softmax."""

    def __init__(self, attn: nn.Module, config: QuantConfig):
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        super().__init__(attn.qkv, attn.proj, attn.num_heads, head_dim, attn.scale,
                         attn.attn_drop, attn.proj_drop, config)
        self.window_size, self.window_area = attn.window_size, attn.window_area
        self.relative_position_bias_table = nn.Parameter(attn.relative_position_bias_table.detach().clone())
        self.register_buffer("relative_position_index", attn.relative_position_index.clone(), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def score_bias(self, num_windows_total: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Relative-position bias plus the shifted-window mask, broadcastable to (B*nW, H, N, N)."""
        bias = self.relative_position_bias()
        if mask is None:
            return bias
        nw, n = mask.shape[0], mask.shape[-1]
        bias = bias.unsqueeze(0) + mask.unsqueeze(1).unsqueeze(0)            # (1, nW, H, N, N)
        return bias.expand(num_windows_total // nw, -1, -1, -1, -1).reshape(-1, self.num_heads, n, n)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        return self.output(self.attend(q, k, v, self.score_bias(x.shape[0], mask)))
