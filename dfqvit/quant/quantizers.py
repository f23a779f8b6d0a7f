"""Quantizer modules. Buffers are created eagerly with their final shapes, so ``state_dict`` round-trips
exactly; ``fake(x)`` returns dequantized values and ``quantize(x)`` integer codes, both through the
shared functions of ``dfqvit.kernels.reference``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from dfqvit.errors import CalibrationError, UnsupportedBitsError

from .functional import (
    fake_quantize_log2,
    fake_quantize_uniform,
    log2_dequantize,
    log2_quantize,
    uniform_dequantize,
    uniform_qrange,
    uniform_quantize,
)
from .search import search_log2, search_uniform

QUANTIZER_BITS = (3, 4, 5, 6, 7, 8)


def _check_quantizer_bits(bits: int) -> None:
    if bits not in QUANTIZER_BITS:
        raise UnsupportedBitsError(f"quantizer bits {bits} not supported; allowed: {QUANTIZER_BITS}")


class _Quantizer(nn.Module):
    """Common switches: ``enabled`` (False = identity) and ``calibrating`` (search the range on the
    next input, then quantize with it)."""

    def __init__(self, bits: int):
        super().__init__()
        _check_quantizer_bits(bits)
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(False))
        self._bits = bits
        self.enabled = True
        self.calibrating = False

    @property
    def num_bits(self) -> int:
        return self._bits

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        bits = state_dict.get(prefix + "bits")
        if bits is not None and int(bits) != self._bits:
            raise UnsupportedBitsError(
                f"{prefix or 'quantizer'}: state dict holds {int(bits)}-bit parameters but this quantizer "
                f"was built for {self._bits} bits; build the model with the same bits before loading")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self.calibrate(x)
        elif not bool(self.initialized):
            raise CalibrationError(
                f"{type(self).__name__} used before calibration; run dfqvit.compile (or calibrate) first")
        return self.fake(x)

    def calibrate(self, x: torch.Tensor) -> None:
        raise NotImplementedError


class UniformQuantizer(_Quantizer):
    """SPDFQ eq. 1. Per tensor (``channels=None``) or per channel along ``channel_dim``.

    Asymmetric codes are in [0, 2^b - 1] with an integer zero point; ``signed=True`` gives the
    symmetric variant (zero point 0, codes in [-2^(b-1), 2^(b-1) - 1]).
    """

    def __init__(
        self,
        bits: int,
        channels: Optional[int] = None,
        channel_dim: int = 0,
        signed: bool = False,
        percentiles: Sequence[float] = (0.999, 0.9999, 0.99999),
        max_elements: int = 1 << 24,
    ):
        super().__init__(bits)
        shape = () if channels is None else (channels,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self.channels = channels
        self.channel_dim = channel_dim
        self._signed = bool(signed)
        self.percentiles = tuple(percentiles)
        self.max_elements = max_elements

    @property
    def qrange(self):
        return uniform_qrange(self._bits, self._signed)

    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channels is None:
            return t
        dim = self.channel_dim % x.dim()
        if x.shape[dim] != self.channels:
            raise CalibrationError(
                f"per-channel quantizer has {self.channels} channels but input dim {dim} has {x.shape[dim]}")
        shape = [1] * x.dim()
        shape[dim] = self.channels
        return t.view(shape)

    def _params(self, x):
        return self._broadcast(self.scale, x), self._broadcast(self.zero_point, x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self._params(x)
        return uniform_quantize(x, scale, zero, *self.qrange)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        scale, zero = self._params(q)
        return uniform_dequantize(q, scale, zero)

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self._params(x)
        return fake_quantize_uniform(x, scale.to(x.dtype), zero.to(x.dtype), *self.qrange)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        if self.channels is not None:
            x = x.movedim(self.channel_dim % x.dim(), 0)
        scale, zero = search_uniform(
            x, self._bits, self.percentiles, signed=self._signed,
            per_channel=self.channels is not None, max_elements=self.max_elements)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero)
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        gran = "per-tensor" if self.channels is None else f"per-channel({self.channels}, dim={self.channel_dim})"
        return f"bits={self._bits}, {gran}, {'symmetric' if self._signed else 'asymmetric'}, enabled={self.enabled}"


class Log2Quantizer(_Quantizer):
    """SPDFQ eq. 2 for post-softmax probabilities: levels delta * 2^-k, k in [0, 2^b - 1], underflow -> 0."""

    def __init__(self, bits: int, percentiles: Sequence[float] = (0.999, 0.9999, 0.99999),
                 max_elements: int = 1 << 24):
        super().__init__(bits)
        self.register_buffer("delta", torch.ones(()))
        self.percentiles = tuple(percentiles)
        self.max_elements = max_elements

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return log2_quantize(x, self.delta, self._bits)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return log2_dequantize(codes, self.delta, self._bits)

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_log2(x, self.delta.to(x.dtype), self._bits)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        self.delta.copy_(search_log2(x, self._bits, self.percentiles, self.max_elements))
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self._bits}, log2, enabled={self.enabled}"
