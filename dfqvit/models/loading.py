"""Build a model from a spec: a reference-model JSON (../shared/models format) or a timm model name
plus an optional checkpoint. Weights are never downloaded (``pretrained=False``)."""
from __future__ import annotations

import importlib
import json
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from dfqvit.errors import CheckpointNotFoundError, DFQViTError, UnsupportedModelError

Normalization = Optional[Tuple[Sequence[float], Sequence[float]]]


def _load_state_dict(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist; give the path of a .safetensors or .pth file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common training-script wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_model(spec: str, checkpoint: Optional[str] = None) -> Tuple[nn.Module, Normalization]:
    """Return ``(model in eval mode, (mean, std) or None)``.

    ``spec`` is either a ``.json`` reference-model description (timm_module, timm_class, kwargs, files,
    mean, std — see ../shared/models/README.md) or a timm model name (built with random weights
    unless ``checkpoint`` is given).
    """
    if spec.endswith(".json"):
        if not os.path.exists(spec):
            raise CheckpointNotFoundError(f"model description {spec!r} does not exist")
        with open(spec) as f:
            meta = json.load(f)
        try:
            cls = getattr(importlib.import_module(meta["timm_module"]), meta["timm_class"])
            model = cls(**meta["kwargs"])
        except (KeyError, ImportError, AttributeError, TypeError) as exc:
            raise DFQViTError(f"{spec!r} is not a usable model description ({exc})") from exc
        folder = os.path.dirname(os.path.abspath(spec))
        files = [checkpoint] if checkpoint else [os.path.join(folder, name) for name in meta.get("files", [])]
        state = {}
        for path in files:
            state.update(_load_state_dict(path))
        model.load_state_dict(state)
        from dfqvit.artifact import set_build_info  # so a saved artifact can rebuild this model
        set_build_info(model, meta["kwargs"])
        norm = (tuple(meta["mean"]), tuple(meta["std"])) if "mean" in meta and "std" in meta else None
        return model.eval(), norm
    import timm

    try:
        model = timm.create_model(spec, pretrained=False)
    except RuntimeError as exc:
        raise UnsupportedModelError(f"timm does not know a model named {spec!r} ({exc})") from exc
    if checkpoint:
        model.load_state_dict(_load_state_dict(checkpoint))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    norm = (tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else None
    return model.eval(), norm
