"""Frozen configuration dataclasses. Every research constant is a named field whose default is the
paper's value, with the equation or table it comes from (see ../shared/design/METHODS.md)."""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict, Tuple, Union

from .errors import DFQViTError, UnsupportedBitsError

WEIGHT_BITS = (3, 4, 5, 6, 7, 8)
ACTIVATION_BITS = (4, 5, 6, 7, 8, 16)  # 16 = activations stay floating point (weight-only)

# [I&S] weight percentile candidates (METHODS §1.2); SPDFQ runs the I&S pipeline.
IS_WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)
# [RepQ, I&S] activation percentile candidates (METHODS §1.2).
ACT_PERCENTILES = (0.999, 0.9999, 0.99999)


class SoftmaxQuantizer(str, enum.Enum):
    """How post-softmax attention probabilities are quantized."""

    LOG2 = "log2"        # SPDFQ eq. 2, levels delta * 2^-k, underflow -> 0 (main tables)
    UNIFORM = "uniform"  # SPDFQ supplementary Table 3 (W8A8 / W4A8 rows)


def parse_bits(bits: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """``4`` -> (4, 4); ``(4, 8)`` -> (4, 8). Raises UnsupportedBitsError with the allowed values."""
    if isinstance(bits, bool) or not isinstance(bits, (int, tuple, list)):
        raise UnsupportedBitsError(
            f"bits={bits!r}: give an int (same bits for weights and activations, e.g. 4) "
            f"or a (weight_bits, activation_bits) tuple, e.g. (4, 8)")
    if isinstance(bits, int):
        w_bits, a_bits = bits, bits
    else:
        if len(bits) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bits):
            raise UnsupportedBitsError(f"bits={bits!r}: a tuple must be two ints (weight_bits, activation_bits)")
        w_bits, a_bits = bits
    _check_bits(w_bits, a_bits)
    return w_bits, a_bits


def _check_bits(w_bits: int, a_bits: int) -> None:
    if w_bits not in WEIGHT_BITS:
        raise UnsupportedBitsError(
            f"weight bits {w_bits} not supported; allowed: {WEIGHT_BITS} "
            f"(packed storage for 3 and 4 bits, int8 storage for 5..8)")
    if a_bits not in ACTIVATION_BITS:
        raise UnsupportedBitsError(
            f"activation bits {a_bits} not supported; allowed: {ACTIVATION_BITS} "
            f"(16 keeps activations in floating point, i.e. weight-only quantization)")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What is quantized and how (METHODS §1).

    Args:
        w_bits: weight bits, channel-wise asymmetric uniform quantizer (SPDFQ eq. 1, §4.1).
        a_bits: activation bits, layer-wise asymmetric uniform quantizer; 16 = weight-only.
        softmax_quantizer: quantizer of the attention probabilities (left operand of attn @ v),
            at ``a_bits``. LOG2 is SPDFQ eq. 2; UNIFORM reproduces the supplementary W8A8/W4A8 table.
        weight_percentiles: candidate upper percentiles for the weight range search (I&S list).
        act_percentiles: candidate upper percentiles for the activation range search (RepQ/I&S).
        quantize_patch_embed: quantize the patch-embedding conv (RepQ: yes at 8 bits; I&S: no).
        quantize_head: quantize the classifier head(s) at the same bits (every nn.Linear, METHODS §1.5).
        calib_images: how many calibration images are used (SPDFQ §4.1: 32 in total).
        calib_batch_size: forward batch during calibration (must not exceed calib_images, Pitfall 6).
        search_max_elements: activation tensors larger than this are range-searched on a fixed,
            evenly strided subsample (torch.quantile / sort cost, Pitfall 5).
        check_inputs: validate shape and finiteness of every input of the quantized model.
    """

    w_bits: int = 4
    a_bits: int = 4
    softmax_quantizer: SoftmaxQuantizer = SoftmaxQuantizer.LOG2
    weight_percentiles: Tuple[float, ...] = IS_WEIGHT_PERCENTILES
    act_percentiles: Tuple[float, ...] = ACT_PERCENTILES
    quantize_patch_embed: bool = False
    quantize_head: bool = True
    calib_images: int = 32
    calib_batch_size: int = 32
    search_max_elements: int = 1 << 24
    check_inputs: bool = True

    version = 1  # class attribute, written into saved configs

    def __post_init__(self):
        _check_bits(self.w_bits, self.a_bits)
        object.__setattr__(self, "softmax_quantizer", SoftmaxQuantizer(self.softmax_quantizer))
        object.__setattr__(self, "weight_percentiles", tuple(float(p) for p in self.weight_percentiles))
        object.__setattr__(self, "act_percentiles", tuple(float(p) for p in self.act_percentiles))
        for name in ("weight_percentiles", "act_percentiles"):
            values = getattr(self, name)
            if not values or not all(0.5 < p <= 1.0 for p in values):
                raise DFQViTError(f"{name}={values}: need a non-empty list of percentiles in (0.5, 1]")
        if self.calib_images < 1 or self.calib_batch_size < 1:
            raise DFQViTError(
                f"calib_images={self.calib_images}, calib_batch_size={self.calib_batch_size}: both must be >= 1")

    @property
    def quantize_activations(self) -> bool:
        return self.a_bits < 16

    def to_dict(self) -> Dict[str, Any]:
        return config_to_dict(self)


_CONFIG_CLASSES: Dict[str, type] = {}


def register_config(cls):
    """Allow-list a config class for :func:`config_from_dict` (loading never builds other types)."""
    _CONFIG_CLASSES[cls.__name__] = cls
    return cls


register_config(QuantConfig)


def config_to_dict(config) -> Dict[str, Any]:
    data = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        elif dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        data[f.name] = value
    return {"_type": type(config).__name__, "_version": type(config).version, "_data": data}


def config_from_dict(payload: Dict[str, Any]):
    """Rebuild a config written by :func:`config_to_dict`; only allow-listed classes are built."""
    try:
        name, version, data = payload["_type"], payload["_version"], payload["_data"]
    except (KeyError, TypeError) as exc:
        raise DFQViTError(f"not a dfqvit config payload (need _type, _version, _data): {payload!r}") from exc
    cls = _CONFIG_CLASSES.get(name)
    if cls is None:
        raise DFQViTError(f"unknown config type {name!r}; known: {sorted(_CONFIG_CLASSES)}")
    if version != cls.version:
        raise DFQViTError(f"{name} version {version} was written by another dfqvit; this one reads version {cls.version}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise DFQViTError(f"{name} has no fields {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, dict) and "_type" in value:
            value = config_from_dict(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
