"""Quantizable layers: QuantLinear, QuantConv2d and attention replacements with attention taps."""
from .attention import AttentionTap, QuantAttention, QuantAttentionBase, QuantWindowAttention
from .linear import QuantConv2d, QuantLinear

__all__ = ["AttentionTap", "QuantAttention", "QuantAttentionBase", "QuantWindowAttention",
           "QuantConv2d", "QuantLinear"]
