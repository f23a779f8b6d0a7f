"""Build-time conversion of a calibrated ``QuantizedModel`` into what the engine reads: packed integer
weights, activation grids as Python numbers, and the float parameters that stay float. Runs once;
``forward`` never sees a float copy of a quantized weight.

Integer conventions (what the kernels consume, see ``dfqvit.kernels``):

* Activations are int8 codes on a per-tensor grid. The fake model's unsigned b-bit codes
  ``[0, 2^b - 1]`` are shifted by ``-2^(b-1)`` together with their zero point, so ``code - zero`` — the
  only thing the integer math uses — is unchanged.
* Weights are unsigned codes per output channel for 3/4-bit storage (signed quantizer codes are shifted
  by ``+2^(b-1)``), int8 rows for 5..8 bits (8-bit unsigned codes are shifted by ``-128``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from dfqvit.errors import UnsupportedModelError
from dfqvit.kernels import KernelInputError, PackedWeight, pack_weight, packed_nbytes
from dfqvit.nn.linear import _QuantWeightLayer
from dfqvit.quant import Log2Quantizer, UniformQuantizer


@dataclass(frozen=True)
class ActGrid:
    """Per-tensor int8 activation grid: ``code = clamp(round(x / scale) + zero, qmin, qmax)``."""

    scale: float
    zero: int
    qmin: int
    qmax: int


@dataclass(frozen=True)
class SoftmaxGrid:
    """Quantizer of the attention probabilities: log2 levels ``delta * 2^-k`` or a uniform grid."""

    log2: bool
    bits: int
    param: float  # delta (log2) or scale (uniform)
    zero: int = 0


def _enabled(quantizer) -> bool:
    return quantizer is not None and quantizer.enabled


def act_grid(quantizer: Optional[UniformQuantizer], where: str) -> Optional[ActGrid]:
    """The int8 grid of an activation quantizer, or None when the activation stays float (A16)."""
    if not _enabled(quantizer):
        return None
    if not isinstance(quantizer, UniformQuantizer) or quantizer.channels is not None:
        raise UnsupportedModelError(
            f"{where}: the engine needs a per-tensor uniform activation quantizer, got {quantizer!r}. dfqvit's "
            "calibration makes per-tensor grids (post-LayerNorm ones are folded to per-tensor); a grid set another "
            "way runs as the fake-quant model (backend='fake')")
    qmin, qmax = quantizer.qrange
    shift = 0 if quantizer._signed else 2 ** (quantizer.num_bits - 1)
    return ActGrid(float(quantizer.scale), int(quantizer.zero_point) - shift, qmin - shift, qmax - shift)


def softmax_grid(quantizer, where: str) -> Optional[SoftmaxGrid]:
    if not _enabled(quantizer):
        return None
    if isinstance(quantizer, Log2Quantizer):
        return SoftmaxGrid(True, quantizer.num_bits, float(quantizer.delta))
    if isinstance(quantizer, UniformQuantizer) and quantizer.channels is None and not quantizer._signed:
        return SoftmaxGrid(False, quantizer.num_bits, float(quantizer.scale), int(quantizer.zero_point))
    raise UnsupportedModelError(f"{where}: softmax quantizer {quantizer!r} is not supported; allowed: log2, or "
                                "per-tensor asymmetric uniform")


def weight_codes(layer: _QuantWeightLayer) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(codes (N, K) int64, w_scale (N,), w_zero (N,), bits) in the storage convention of ``pack_weight``;
    a conv weight (N, C, kh, kw) is flattened to (N, C*kh*kw) in the order patches are flattened."""
    wq = layer.weight_quantizer
    bits = wq.num_bits
    with torch.no_grad():
        codes = wq.quantize(layer.weight.detach().float()).reshape(layer.weight.shape[0], -1)
    codes = codes.round().to(torch.int64)
    zero = wq.zero_point.detach().round().to(torch.int64)
    if wq._signed and bits <= 4:
        shift = 2 ** (bits - 1)
    elif not wq._signed and bits == 8:
        shift = -128
    else:
        shift = 0
    return codes + shift, wq.scale.detach().float(), zero + shift, bits


class _PanelsOnlyError(UnsupportedModelError, AttributeError):
    """An AttributeError too, so ``hasattr(layer, "weight")`` is False instead of raising."""

    def __init__(self):
        super().__init__("this layer holds CPU panels for the native backend; rebuild the engine with another "
                         "backend to get the GPU packing layout")


class PackedLinear(nn.Module):
    """A quantized Linear (or patch-embedding conv as a GEMM) ready for the kernels.

    Buffers: ``data``/``w_scale``/``w_zero``/``w_col_sums`` (see ``PackedWeight``) and ``bias`` (fp32).
    ``act``: the grid of the input activations, None for weight-only (A16) layers.
    """

    def __init__(self, layer: _QuantWeightLayer, where: str):
        super().__init__()
        codes, scale, zero, bits = weight_codes(layer)
        try:
            packed = pack_weight(codes.cpu(), scale.cpu(), zero.cpu(), bits)
        except KernelInputError as exc:  # an UnsupportedModelError lets "auto" fall back to the fake-quant model
            raise UnsupportedModelError(f"{where}: the engine cannot pack these weights exactly ({exc})") from None
        device = layer.weight.device
        for name in ("data", "w_scale", "w_zero", "w_col_sums"):
            self.register_buffer(name, getattr(packed, name).to(device))
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        self.register_buffer("panels", None)  # CPU panels once to_cpu_panels ran (then ``data`` is None)
        self.n, self.k, self.bits, self.layout, self.group_k = packed.n, packed.k, bits, packed.layout, packed.group_k
        self.where = where  # the layer's name in the quantized model (and in its artifact)
        self.act = act_grid(layer.input_quantizer, where)

    def to_cpu_panels(self, prepack) -> None:
        """Replace the GPU-layout bytes by the native backend's CPU panels (``kernels.native.prepack``)."""
        if self.panels is not None:
            return
        self.register_buffer("panels", prepack(self.data, self.layout.storage_bits, self.k, self.group_k))
        self.register_buffer("data", None)

    @property
    def weight(self) -> PackedWeight:
        if self.data is None:
            raise _PanelsOnlyError()
        return PackedWeight(data=self.data, w_scale=self.w_scale, w_zero=self.w_zero, w_col_sums=self.w_col_sums,
                            n=self.n, k=self.k, bits=self.bits, layout=self.layout,
                            group_k=self.group_k)

    def __getattr__(self, name: str):
        # A property raising AttributeError falls through to nn.Module.__getattr__, which would replace the
        # message by "has no attribute 'weight'"; keep ours (and keep hasattr / getattr(m, "weight", None) working).
        if name == "weight" and self.__dict__.get("_buffers", {}).get("data", 0) is None:
            raise _PanelsOnlyError()
        return super().__getattr__(name)

    def weight_nbytes(self) -> int:
        """Bytes of the packed weight (GPU layout or CPU panels) and its per-channel parameters (bias not
        counted)."""
        if self.panels is not None:
            return sum(t.numel() * t.element_size() for t in (self.panels, self.w_scale, self.w_zero,
                                                                self.w_col_sums))
        return packed_nbytes(self.weight)

    def extra_repr(self) -> str:
        # Activation bits from the grid's levels (every grid is stored as int8 codes, A4 too).
        act = "A16" if self.act is None else f"A{(self.act.qmax - self.act.qmin + 1).bit_length() - 1}"
        return f"in={self.k}, out={self.n}, W{self.bits}{act}, layout={self.layout.value}"


def float_copy(module: nn.Module) -> nn.Module:
    """A float32 copy of a module the engine runs as is (skipped layers, LayerNorms). A LayerNorm without a weight
    or bias gets ones / zeros (the same values: the kernels take both)."""
    import copy

    module = copy.deepcopy(module).float().eval()
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        if module.weight is None:
            module.weight = nn.Parameter(torch.ones(shape), requires_grad=False)
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(shape), requires_grad=False)
    return module
