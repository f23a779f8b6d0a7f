"""The front door: ``dfqvit.compile``, ``dfqvit.save``, ``dfqvit.load``."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .calib.pipeline import run_pipeline
from .config import CalibConfig, CorrectionConfig, QuantConfig, ReconConfig, SynthConfig, check_seed, parse_bits
from .errors import DFQViTError, MissingGPUError, UnsupportedModelError, warn_user
from .models import QuantizedModel

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
        raise DFQViTError(f"bits={bits!r} disagrees with config (W{config.w_bits}A{config.a_bits}); pass only one of "
                          "them (bits=None takes the config's)")
    return config


def resolve_device(device, name: str = "device") -> torch.device:
    """``device`` (None: the CPU) as a torch.device dfqvit runs on, or an error that says what to give: the one
    check of compile, load, evaluate and the command lines (``name="--device"`` words it as a flag)."""
    flag = name.startswith("--")

    def value(text) -> str:
        return str(text) if flag else repr(str(text))

    def given(text) -> str:
        return f"{name} {text}" if flag else f"{name}={text!r}"

    try:
        device = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError):
        raise DFQViTError(f"{given(device)}: give {value('cpu')} or {value('cuda')} (or {value('cuda:N')})") from None
    if device.type not in ("cpu", "cuda"):  # "meta" failed on .item() deep in the calibration
        raise DFQViTError(f"{given(str(device))}: dfqvit runs on {value('cpu')} or {value('cuda')} (or "
                          f"{value('cuda:N')})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MissingGPUError(f"{given(str(device))} was requested but no CUDA device is available; use "
                              f"{given('cpu')}")
    return device


def _check_type(name: str, value, cls, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, cls):
        allowed = f"a dfqvit.{cls.__name__}" + (" or None (skip the stage)" if optional else "")
        raise DFQViTError(f"{name} must be {allowed}, got {type(value).__name__}")


# SPDFQ is the paper's data source; the method is registered by dfqvit.synth.spdfq.
DEFAULT_CALIB = "spdfq"


def compile(
    model: nn.Module,
    bits: Optional[Bits] = None,
    calib=DEFAULT_CALIB,
    *,
    config: Optional[QuantConfig] = None,
    normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
    seed: int = 0,
    device=None,
    progress: bool = True,
    synth=None,
    calibration: CalibConfig = CalibConfig(),
    recon: Optional[ReconConfig] = ReconConfig(),
    correction: Optional[CorrectionConfig] = CorrectionConfig(),
    stages_dir: Optional[str] = None,
    backend: str = "auto",
):
    """Quantize a trained timm ViT / DeiT / Swin and return it running on the integer engine.

    With no other argument than ``bits`` this runs the whole data-free pipeline: SPDFQ synthesis of 32
    images → block-wise percentile calibration → two-stage block reconstruction → activation correction.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, DeiT-distilled) or ``SwinTransformer``; it is
            copied (in float32, whatever its dtype), never modified.
        bits: 4 means W4A4; ``(w, a)`` picks weight bits 3..8 and activation bits 4..8 or 16 (weight-only).
            Default (None): the bits of ``config``, or W4A4 without one.
        calib: calibration data — a method name (``"spdfq"``, ``"gaussian"``, see
            ``dfqvit.synth.available_methods()``), normalized images as a (B, C, H, W) tensor, a
            ``SyntheticSet`` or a DataLoader of images.
        config: a ``QuantConfig`` with everything else (percentiles, softmax quantizer, ...).
        normalization: (mean, std) of the model's input space when the model does not carry it
            (used by synthesis and image loading).
        seed: seed of the data-free synthesis and of the reconstruction's mini-batches.
        device: where the pipeline runs ("cpu" or "cuda"); the returned model stays there.
        synth: the synthesis method's config (a ``SynthConfig``); None = the method's paper defaults.
        calibration: ``CalibConfig`` (block-wise search, post-LayerNorm re-parameterisation).
        recon: ``ReconConfig`` of the block reconstruction, or None to skip it.
        correction: ``CorrectionConfig`` of the activation correction, or None to skip it.
        stages_dir: folder where each stage's result is saved; a later call with the same folder resumes
            after the last stage whose saved result was made with the same settings.
        backend: "auto" (default) returns the integer engine ``QuantizedViT`` for the device: Triton kernels
            on CUDA, on a CPU the native C++ kernels where ``dfqvit._C`` is built for AVX2 or later, else the
            PyTorch reference ops; "triton" / "native" / "torch" force one (checked before the calibration: a
            backend the device lacks, or a model it cannot run, raises at once). "fake" returns the fake-quant
            ``QuantizedModel`` (float math on quantized values; trainable, inspectable). See ``as_backend`` for
            what "auto" does with a model the engine cannot run, and what the engine keeps for ``dfqvit.save``.
    """
    config = _resolve_config(bits, config)
    device = resolve_device(device)
    seed = check_seed(seed)
    if isinstance(progress, str) or not isinstance(progress, (bool, int, np.bool_)):  # progress="no" showed the bars
        raise DFQViTError(f"progress={progress!r}: give True or False")
    progress = bool(progress)  # 0 / 1 (argparse counts) and numpy bools too
    if stages_dir is not None and not isinstance(stages_dir, (str, os.PathLike)):
        raise DFQViTError(f"stages_dir={stages_dir!r}: give a folder path or None")
    _check_type("calibration", calibration, CalibConfig, optional=False)
    _check_type("recon", recon, ReconConfig)
    _check_type("correction", correction, CorrectionConfig)
    if synth is not None and not isinstance(synth, SynthConfig):
        raise DFQViTError(f"synth must be a dfqvit.SynthConfig or None (the method's paper defaults), got "
                          f"{type(synth).__name__}")
    if synth is not None and not isinstance(calib, str):
        raise DFQViTError(f"synth= configures a synthesis method, but calib is {type(calib).__name__} (images "
                          "already made): drop synth=, or give a method name as calib")
    backend = preflight_backend(model, backend, config, device)
    result = run_pipeline(model, config, calib, normalization=normalization, seed=seed, device=device,
                          progress=progress, synth=synth, calibration=calibration, recon=recon,
                          correction=correction, stages_dir=stages_dir)
    return as_backend(result.qmodel, backend)


def _check_backend(backend: str) -> None:
    if backend == "fake":  # no need to import the engine, its kernels and triton
        return
    from .engine.backends import BACKENDS

    if backend not in BACKENDS:
        raise DFQViTError(f"backend={backend!r}; allowed: {', '.join(repr(b) for b in BACKENDS)} "
                          f"('fake' = fake-quant model, 'auto' = integer engine for the device)")


def preflight_backend(model: nn.Module, backend: str = "auto", config: Optional[QuantConfig] = None,
                      device=None) -> str:
    """What ``backend`` will give for ``model`` quantized with ``config`` on ``device``, decided from the
    model's structure before any calibration: a named engine backend ("triton", "native", "torch") that the
    device lacks or that cannot run ``model`` raises now rather than after the calibration; under "auto" such
    a model is announced with a warning and "fake" is returned (the fake-quant model runs it). ``compile``
    calls this first; call it yourself before a calibration you run another way."""
    from .models.base import find_adapter

    _check_backend(backend)
    if config is not None and not isinstance(config, QuantConfig):
        raise DFQViTError(f"config must be a dfqvit.QuantConfig or None, got {type(config).__name__}")
    device = resolve_device(device)  # MissingGPUError for a CUDA device that is not there
    find_adapter(model)  # a model dfqvit cannot quantize at all is an error under every backend
    if backend == "fake":
        return backend
    from .engine.backends import select_kernels
    from .engine.support import check_engine_support

    select_kernels(backend, device)  # MissingGPUError / native extension not built
    try:
        check_engine_support(model, config or QuantConfig())
    except UnsupportedModelError as exc:
        if backend != "auto":
            raise
        _warn_fake_fallback(exc)
        return "fake"
    return backend


def _warn_fake_fallback(exc: UnsupportedModelError) -> None:
    warn_user("dfqvit: the integer engine cannot run this model, so the result is the fake-quant QuantizedModel "
              f"(backend='fake' asks for it without this warning): {exc}")


def as_backend(qmodel: QuantizedModel, backend: str = "auto", artifact=None):
    """``qmodel`` on ``backend``: itself for "fake", else its integer engine ``QuantizedViT``.

    The engine keeps the model's ``QuantArtifact`` (``engine.artifact``: integer codes — packed for 3 and 4
    bits, half a byte per 4-bit weight — and the float parameters, on the CPU; ``artifact`` when given, else
    made from ``qmodel``) so that ``dfqvit.save(engine, path)`` writes the same file as saving the fake-quant
    model, and ``engine.artifact.to_model()`` gives that model back. ``engine.artifact = None`` frees it.

    With "auto", a model the engine cannot run (``UnsupportedModelError``: e.g. a tanh GELU,
    ``dynamic_img_size``, activation grids set per channel outside dfqvit's calibration) comes back as the
    fake-quant model with a warning that says why, so a finished calibration is not lost; a named engine backend
    raises instead. (``compile`` checks the model's structure before calibrating, so most of these come at its
    start; see ``engine.support``.)
    """
    if backend == "fake":
        return qmodel
    from .artifact import QuantArtifact
    from .engine import QuantizedViT

    try:
        engine = QuantizedViT(qmodel, backend)
    except UnsupportedModelError as exc:
        if backend != "auto":
            raise
        _warn_fake_fallback(exc)
        return qmodel
    engine.artifact = artifact if artifact is not None else QuantArtifact.from_model(qmodel)
    return engine


def save(qmodel, path: str) -> None:
    """Write a quantized model as a ``QuantArtifact`` (one safetensors file: integer weights, scales, zero
    points, float parameters and a JSON config with versions and how to rebuild the model). ``qmodel``: what
    ``dfqvit.compile`` / ``dfqvit.load`` returned, the integer engine or the fake-quant model."""
    from .artifact import save as save_artifact

    if isinstance(qmodel, QuantizedModel):
        save_artifact(qmodel, path)
        return
    from .engine import QuantizedViT

    if not isinstance(qmodel, QuantizedViT):
        raise DFQViTError(f"dfqvit.save expects the model returned by dfqvit.compile or dfqvit.load (a QuantizedViT "
                          f"engine or a QuantizedModel), got {type(qmodel).__name__}")
    if qmodel.artifact is None:
        raise DFQViTError("this engine keeps no QuantArtifact (it was built from a QuantizedModel directly, or its "
                          "artifact was set to None): save the QuantizedModel it was built from instead")
    qmodel.artifact.save(path)


def load(path: str, model: Optional[nn.Module] = None, device=None, backend: str = "auto"):
    """Read a ``QuantArtifact`` back: the integer engine (``backend`` as in ``compile``, default "auto") or,
    with ``backend="fake"``, the fake-quant QuantizedModel; both with the saved model's exact behaviour.

    ``model``: a float model of the same architecture to use as the skeleton, needed only when the
    artifact does not record the model's constructor arguments. A truncated, corrupted or
    version-mismatched file raises ``dfqvit.ArtifactError``.
    """
    from .artifact import QuantArtifact

    _check_backend(backend)
    artifact = QuantArtifact.load(path)
    qmodel = artifact.to_model(model, device=resolve_device(device) if device is not None else None)
    return as_backend(qmodel, backend, artifact=artifact)


def with_config(qconfig: QuantConfig, **changes) -> QuantConfig:
    """Copy of a frozen config with some fields changed."""
    return dataclasses.replace(qconfig, **changes)
