"""Quantized Linear and Conv2d: channel-wise weight quantizer + layer-wise input quantizer (METHODS §1.5).

The float weight stays a Parameter: reconstruction trains it through the STE, and the engine
re-quantizes it with the frozen scales at export."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfqvit.config import QuantConfig
from dfqvit.quant import UniformQuantizer


def make_input_quantizer(config: QuantConfig, bits: Optional[int] = None) -> Optional[UniformQuantizer]:
    """Layer-wise activation quantizer at ``bits`` (default ``a_bits``), or None for weight-only (A16) configs."""
    if not config.quantize_activations:
        return None
    return UniformQuantizer(bits or config.a_bits, percentiles=config.act_percentiles,
                            max_elements=config.search_max_elements)


def make_weight_quantizer(out_channels: int, config: QuantConfig) -> UniformQuantizer:
    return UniformQuantizer(config.w_bits, channels=out_channels, channel_dim=0,
                            percentiles=config.weight_percentiles)


class _QuantWeightLayer(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], config: QuantConfig,
                 input_bits: Optional[int] = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.weight_quantizer = make_weight_quantizer(weight.shape[0], config)
        self.input_quantizer = make_input_quantizer(config, input_bits)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        self.weight_quantizer.calibrate(self.weight)


class QuantLinear(_QuantWeightLayer):
    def __init__(self, linear: nn.Linear, config: QuantConfig):
        super().__init__(linear.weight, linear.bias, config)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantConv2d(_QuantWeightLayer):
    """Patch-embedding convolution (per output filter weight scales); the image in front of it is quantized at
    ``config.image_bits`` (RepQ: 8 bits whatever the activation bits)."""

    def __init__(self, conv: nn.Conv2d, config: QuantConfig):
        super().__init__(conv.weight, conv.bias, config, input_bits=config.image_bits)
        self.kernel_size = conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            from dfqvit.errors import UnsupportedModelError
            raise UnsupportedModelError(f"Conv2d padding_mode={conv.padding_mode!r} is not supported; only 'zeros'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantized_input(x), self.quantized_weight(), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)
