"""Build a model from a spec: a reference-model JSON (../shared/models format) or a timm model name
plus an optional checkpoint. Weights are never downloaded (``pretrained=False``)."""
from __future__ import annotations

import importlib
import json
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from dfqvit.errors import CheckpointNotFoundError, DFQViTError, UnsupportedModelError

Normalization = Optional[Tuple[Sequence[float], Sequence[float]]]


def _is_safetensors(path: str) -> bool:
    """safetensors by content (an 8-byte header length, then the JSON header), whatever the file is named."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_state_dict(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist; give the path of a .safetensors or .pth file")
    if os.path.isdir(path):
        raise DFQViTError(f"checkpoint {path!r} is a folder; give the .safetensors or .pth file in it")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zipfile and safetensors each raise their own types for bad bytes
        raise DFQViTError(f"checkpoint {path!r} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); give a "
                          ".safetensors file or a state dict saved with torch.save") from None
    for key in ("state_dict", "model"):  # common training-script wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DFQViTError(f"checkpoint {path!r} holds a {type(state).__name__}, not a state dict")
    return state


def _read_description(spec: str) -> dict:
    if not os.path.exists(spec):
        raise CheckpointNotFoundError(f"model description {spec!r} does not exist")
    try:
        with open(spec) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise DFQViTError(f"{spec!r} is not a readable model description ({exc})") from None
    if not isinstance(meta, dict):
        raise DFQViTError(f"{spec!r} is not a model description (a JSON object with timm_module, timm_class, ...)")
    return meta


def model_weight_files(spec: str, checkpoint: Optional[str] = None) -> List[str]:
    """The weight files ``load_model(spec, checkpoint)`` reads: ``checkpoint``, else those a ``.json`` lists."""
    if checkpoint:
        return [checkpoint]
    if not spec.endswith(".json"):
        return []
    folder = os.path.dirname(os.path.abspath(spec))
    files = _read_description(spec).get("files", [])
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise DFQViTError(f"{spec!r}: 'files' must be a list of weight file names, got {files!r}")
    return [os.path.join(folder, name) for name in files]


def load_checkpoint(model: nn.Module, state: dict, source: str, spec: str) -> None:
    """``model.load_state_dict(state)`` that names what does not fit (PyTorch lists every key in one line)."""
    if not isinstance(state, dict):
        raise DFQViTError(f"checkpoint {source!r} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
        problems = [f"{len(shapes)} tensors of other shapes ({few(shapes)})" if shapes else "",
                    f"{len(missing)} tensors missing ({few(missing)})" if missing else "",
                    f"{len(unexpected)} unexpected tensors ({few(unexpected)})" if unexpected else ""]
        raise DFQViTError(f"checkpoint {source!r} does not fit the model {spec!r}: "
                          f"{'; '.join(p for p in problems if p)}. Give the timm model name (or .json) the "
                          "checkpoint was trained as, with its settings (num_classes, img_size, ...)")
    model.load_state_dict(state)


def _checkpoint_classes(model: nn.Module, state: dict) -> Optional[int]:
    """The class count of the checkpoint's classifier (timm's ``pretrained_cfg["classifier"]``), if it has one."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    head = cfg.get("classifier", "head")
    head = head[0] if isinstance(head, (tuple, list)) else head
    weight = state.get(f"{head}.weight") if isinstance(state, dict) else None
    return int(weight.shape[0]) if getattr(weight, "ndim", 0) == 2 else None


def load_model(spec: str, checkpoint: Optional[str] = None) -> Tuple[nn.Module, Normalization]:
    """Return ``(model in eval mode, (mean, std) or None)``.

    ``spec`` is either a ``.json`` reference-model description (timm_module, timm_class, kwargs, files,
    mean, std — see ../shared/models/README.md) or a timm model name (built with random weights
    unless ``checkpoint`` is given).
    """
    if spec.endswith(".json"):
        meta = _read_description(spec)
        try:
            cls = getattr(importlib.import_module(meta["timm_module"]), meta["timm_class"])
            model = cls(**meta["kwargs"])
        except (KeyError, ImportError, AttributeError, TypeError) as exc:
            raise DFQViTError(f"{spec!r} is not a usable model description ({exc})") from exc
        files = model_weight_files(spec, checkpoint)
        if not files:
            raise DFQViTError(f"{spec!r} lists no weight files ('files'); list them there or give a checkpoint "
                              "(--checkpoint)")
        state = {}
        for path in files:
            state.update(_load_state_dict(path))
        load_checkpoint(model, state, checkpoint or ", ".join(files), spec)
        from dfqvit.artifact import set_build_info  # so a saved artifact can rebuild this model
        set_build_info(model, meta["kwargs"])
        norm = (tuple(meta["mean"]), tuple(meta["std"])) if "mean" in meta and "std" in meta else None
        return model.eval(), norm
    import timm

    if os.path.exists(spec) or os.sep in spec or spec.endswith((".pth", ".pt", ".safetensors", ".bin")):
        what = "is a file" if os.path.isfile(spec) else ("is a folder" if os.path.isdir(spec) else "does not exist")
        raise DFQViTError(f"--model / spec {spec!r} {what}: give a reference-model .json (../shared/models format) or "
                          "a timm model name such as deit_small_patch16_224, and a weights file as the checkpoint "
                          "(--checkpoint)")
    try:
        model = timm.create_model(spec, pretrained=False)
    except (RuntimeError, ValueError) as exc:
        raise UnsupportedModelError(f"timm does not know a model named {spec!r} ({exc}); names: "
                                    "timm.list_models('*vit*'), timm.list_models('swin*')") from exc
    if checkpoint:
        state = _load_state_dict(checkpoint)
        classes = _checkpoint_classes(model, state)
        if classes is not None and classes != model.num_classes:  # a fine-tuned head: build the model to match
            model = timm.create_model(spec, pretrained=False, num_classes=classes)
        load_checkpoint(model, state, checkpoint, spec)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    norm = (tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else None
    return model.eval(), norm
