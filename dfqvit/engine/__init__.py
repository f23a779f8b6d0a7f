"""The quantized ViT engine: the real integer model of a calibrated ``QuantizedModel``.

    engine = dfqvit.engine.build_engine(qmodel)                 # or a QuantArtifact, or a saved file
    engine = dfqvit.engine.build_engine(qmodel, backend="native")   # or "torch": same bits, plain PyTorch
    logits = engine(images)

Modules: ``pack.py`` (packing, once at build), ``backends.py`` (Triton / PyTorch kernel sets),
``blocks.py`` (patch embedding, ViT and Swin blocks), ``model.py`` (``QuantizedViT``), ``graphs.py``
(CUDA graphs per batch bucket).
"""
from __future__ import annotations

import os
from typing import Optional, Union

from torch import nn

from dfqvit.errors import DFQViTError
from dfqvit.models import QuantizedModel

from .backends import BACKENDS
from .graphs import BATCH_BUCKETS, CUDAGraphRunner
from .model import QuantizedViT


def build_engine(source, backend: str = "auto", *, model: Optional[nn.Module] = None, device=None,
                 **kwargs) -> Union[QuantizedViT, QuantizedModel]:
    """The engine of ``source``: a calibrated ``QuantizedModel``, a ``QuantArtifact``, the path of a saved
    artifact, or a ``QuantizedViT`` (its artifact: another backend or device of the same calibration);
    ``model``/``device`` are passed to the artifact loader.

    ``backend``: "auto" (Triton on CUDA, native C++ kernels on CPU when ``dfqvit._C`` is built, else PyTorch),
    "triton", "native", "torch", or "fake" to get the fake-quant
    ``QuantizedModel`` of the same calibration back (for comparison and debugging). ``kwargs`` go to
    ``QuantizedViT`` (``dtype``, ``cuda_graphs``).
    """
    if backend not in BACKENDS:
        raise DFQViTError(f"backend={backend!r}; allowed: {', '.join(repr(b) for b in BACKENDS)}")
    if device is not None:  # "gpu" was torch's raw RuntimeError, "cuda" without a GPU a driver message
        from dfqvit.api import resolve_device
        device = resolve_device(device)
    if isinstance(source, (str, os.PathLike)):
        from dfqvit.artifact import QuantArtifact
        source = QuantArtifact.load(os.fspath(source))
    if isinstance(source, QuantizedViT):  # what dfqvit.compile / dfqvit.load return by default
        if source.artifact is None:
            raise DFQViTError("this engine was built from a QuantizedModel directly and keeps no artifact: give "
                              "build_engine that QuantizedModel")
        source = source.artifact
    artifact = None
    if not isinstance(source, QuantizedModel):
        from dfqvit.artifact import QuantArtifact
        if not isinstance(source, QuantArtifact):
            raise DFQViTError(f"build_engine expects an engine or a QuantizedModel (dfqvit.compile), a QuantArtifact "
                              f"or a path, got {type(source).__name__}")
        artifact, source = source, source.to_model(model, device=device)
    elif device is not None:
        source = source.to(device)
    if backend == "fake":
        given = sorted(k for k, v in kwargs.items() if v is not None)  # None: the defaults, harmless
        if given:  # dtype / cuda_graphs shape the engine only: they were accepted and ignored
            raise DFQViTError(f"{', '.join(given)}: no effect with backend='fake' (the fake-quant model runs in "
                              "float32); drop them or pick an engine backend")
        return source
    engine = QuantizedViT(source, backend, **kwargs)
    engine.artifact = artifact  # an engine of an artifact can be saved again (dfqvit.save)
    return engine


__all__ = ["build_engine", "QuantizedViT", "CUDAGraphRunner", "BATCH_BUCKETS", "BACKENDS"]
