"""The front door: ``dfqvit.compile``."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .calib import calibrate, calibration_images
from .config import QuantConfig, parse_bits
from .errors import DFQViTError, MissingGPUError
from .models import QuantizedModel, adapt

Bits = Union[int, Tuple[int, int]]


def _resolve_config(bits: Optional[Bits], config: Optional[QuantConfig]) -> QuantConfig:
    if config is None:
        w_bits, a_bits = parse_bits(4 if bits is None else bits)
        return QuantConfig(w_bits=w_bits, a_bits=a_bits)
    if not isinstance(config, QuantConfig):
        raise DFQViTError(f"config must be a dfqvit.QuantConfig, got {type(config).__name__}")
    if bits is None:
        return config
    w_bits, a_bits = parse_bits(bits)
    if (w_bits, a_bits) != (config.w_bits, config.a_bits):
        raise DFQViTError(
            f"bits={bits!r} disagrees with config (W{config.w_bits}A{config.a_bits}); pass one of them")
    return config


def _resolve_device(device) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MissingGPUError(f"device={device} was requested but no CUDA device is available; use device='cpu'")
    return device


def compile(
    model: nn.Module,
    bits: Optional[Bits] = 4,
    calib="gaussian",
    *,
    config: Optional[QuantConfig] = None,
    normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
    seed: int = 0,
    device=None,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize a trained timm ViT / DeiT / Swin and return the calibrated fake-quant model.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, DeiT-distilled) or ``SwinTransformer``; it is
            copied, never modified.
        bits: 4 means W4A4; ``(w, a)`` picks weight bits 3..8 and activation bits 4..8 or 16 (weight-only).
            Pass ``None`` to take the bits from ``config``.
        calib: calibration data — a method name (``"gaussian"``, see ``dfqvit.synth.available_methods()``),
            normalized images as a (B, C, H, W) tensor, a ``SyntheticSet`` or a DataLoader of images.
        config: a ``QuantConfig`` with everything else (percentiles, softmax quantizer, ...).
        normalization: (mean, std) of the model's input space when the model does not carry it
            (used by synthesis and image loading).
        seed: seed of the data-free synthesis.
        device: where calibration runs ("cpu" or "cuda"); the returned model stays there.
    """
    config = _resolve_config(bits, config)
    device = _resolve_device(device)
    qmodel = adapt(model, config, normalization=normalization).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = calibration_images(calib, qmodel, config.calib_images, seed=seed, progress=progress)
    calibrate(qmodel, images.to(device), progress=progress)
    return qmodel


def with_config(qconfig: QuantConfig, **changes) -> QuantConfig:
    """Copy of a frozen config with some fields changed."""
    return dataclasses.replace(qconfig, **changes)
