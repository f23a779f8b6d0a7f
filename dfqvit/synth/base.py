"""``SyntheticSet`` (the saveable result of a synthesis run) and the registry of synthesis methods.

A method is a function ``fn(qmodel, num_images, seed, config, progress) -> SyntheticSet`` registered by
name; ``dfqvit.compile(calib="name")`` and the CLI look methods up here."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from dfqvit.caller_state import training_state
from dfqvit.config import check_seed, config_to_dict
from dfqvit.errors import CalibrationError, CheckpointNotFoundError, DFQViTError

from .common import check_num_images

SET_FORMAT_VERSION = 1


@dataclasses.dataclass
class SyntheticSet:
    """Calibration images in the model's normalized input space.

    images: (B, C, H, W) float32. targets: (B,) int64 main class per image, or None when the method
    uses no labels. method/seed/config describe how they were made (config is a plain dict).
    """

    images: torch.Tensor
    targets: Optional[torch.Tensor]
    method: str
    seed: int
    config: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        """An int gives one sample as ``TensorDataset`` does: ``(image, target)``, or ``(image,)`` without targets,
        so a ``DataLoader`` reads the set directly. A slice, a 1-D index list / array / tensor or a bool mask gives a
        ``SyntheticSet`` of those images (same method, seed and config, e.g. ``synthetic[:16]`` to calibrate on
        fewer; one that reorders or repeats images records ``config["reordered"]``, so an easy -> hard set taken
        out of order no longer counts as one)."""
        if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
            index = index.item()  # a 0-d tensor gave a "set" whose images were one image's channels
        if isinstance(index, (bool, np.bool_)):  # a bool is an int to Python: set[True] gave image 1
            raise TypeError("SyntheticSet indices are ints, slices, index lists or masks, not bool")
        if isinstance(index, (int, np.integer)):
            image = self.images[int(index)]
            return (image,) if self.targets is None else (image, self.targets[int(index)])
        if isinstance(index, slice):  # through range: a negative step is not a tensor slice
            rows = torch.as_tensor(range(len(self))[index], dtype=torch.long, device=self.images.device)
        elif isinstance(index, (list, tuple, range, np.ndarray, torch.Tensor)):
            rows = torch.as_tensor(index, device=self.images.device)
            rows = rows.long() if rows.numel() == 0 else rows  # [] is a float tensor to torch
            if rows.dim() != 1 or rows.is_floating_point():
                raise TypeError(f"SyntheticSet takes a 1-D list of ints or a bool mask, got {rows.dtype} of shape "
                                f"{tuple(rows.shape)}")
        else:
            raise TypeError(f"SyntheticSet indices are ints, slices, index lists or masks, not {type(index).__name__}")
        config = self.config if _in_order(rows, len(self)) else {**self.config, "reordered": True}
        return dataclasses.replace(self, images=self.images[rows], config=config,
                                   targets=None if self.targets is None else self.targets[rows])

    @property
    def ordered_easy_to_hard(self) -> bool:
        """Whether the images run from easy to hard: made by such a method (``dfqvit``), not reordered since."""
        return easy_to_hard(self.method) and not self.config.get("reordered", False)

    def to(self, device) -> "SyntheticSet":
        """The same set with its images (and targets) on ``device`` (images stay float32: the set is made in it)."""
        from dfqvit.api import resolve_device  # api imports synth: import at call time

        if isinstance(device, torch.dtype):  # a dtype here cast the int64 targets too
            raise TypeError(f"SyntheticSet.to takes a device, not {device}: the images stay float32 (cast "
                            "set.images yourself)")
        device = resolve_device(device)  # "cuda" without a GPU was torch's "Found no NVIDIA driver"
        return dataclasses.replace(self, images=self.images.to(device),
                                   targets=None if self.targets is None else self.targets.to(device))

    def save(self, path: str) -> None:
        """One safetensors file (written atomically, folders made); the metadata holds method, seed and config as
        JSON."""
        from dfqvit.artifact import save_safetensors_atomically

        tensors = {"images": self.images.detach().float().cpu().contiguous()}
        if self.targets is not None:
            tensors["targets"] = self.targets.detach().long().cpu().contiguous()
        meta = {"format": "dfqvit.SyntheticSet", "version": str(SET_FORMAT_VERSION), "method": self.method,
                "seed": str(self.seed), "config": json.dumps(self.config, sort_keys=True)}
        save_safetensors_atomically(path, tensors, meta)

    @classmethod
    def load(cls, path: str) -> "SyntheticSet":
        from safetensors import safe_open

        if not os.path.exists(path):
            raise CheckpointNotFoundError(f"synthetic set {path!r} does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise DFQViTError(f"{path!r} is not a readable safetensors file ({exc}); re-create it") from exc
        if meta.get("format") != "dfqvit.SyntheticSet" or meta.get("version") != str(SET_FORMAT_VERSION):
            found = {k: meta[k] for k in ("format", "version") if k in meta}  # an artifact's config is kilobytes
            raise DFQViTError(f"{path!r} is not a dfqvit SyntheticSet of version {SET_FORMAT_VERSION} (it says "
                              f"{found or 'nothing'}); give a file written by dfqvit synth --out or SyntheticSet.save")
        return cls(images=tensors["images"], targets=tensors.get("targets"), method=meta["method"],
                   seed=int(meta["seed"]), config=json.loads(meta["config"]))


def _in_order(rows: torch.Tensor, size: int) -> bool:
    """Whether an index selection (a bool mask, or ints that may count from the end) keeps the rows' order without
    repeats."""
    if rows.dtype == torch.bool or rows.numel() < 2:
        return True
    rows = torch.where(rows < 0, rows + size, rows)
    return bool((rows[1:] > rows[:-1]).all())


SynthFn = Callable[..., SyntheticSet]
_METHODS: Dict[str, SynthFn] = {}


_READS_QUANTIZED_MODEL = set()
_EASY_TO_HARD = set()


def register_synth(name: str, reads_quantized_model: bool = False, easy_to_hard: bool = False):
    """Decorator: register a synthesis function under ``name``; ``reads_quantized_model``: its images depend on
    the quantization settings too (not only on the float model), so saved stages key on them; ``easy_to_hard``:
    its sets run from easy to hard images, so the reconstruction may draw a growing prefix (METHODS §4.1)."""
    def deco(fn: SynthFn) -> SynthFn:
        _METHODS[name] = fn
        if reads_quantized_model:
            _READS_QUANTIZED_MODEL.add(name)
        if easy_to_hard:
            _EASY_TO_HARD.add(name)
        return fn
    return deco


def reads_quantized_model(method: str) -> bool:
    return method in _READS_QUANTIZED_MODEL


def easy_to_hard(method: str) -> bool:
    """Whether ``method``'s images come ordered from easy to hard."""
    return method in _EASY_TO_HARD


def available_methods():
    return sorted(_METHODS)


@training_state
def synthesize(method: str, qmodel, num_images: int = 32, seed: int = 0, config=None,
               progress: bool = True) -> SyntheticSet:
    """Run the synthesis method ``method`` for ``qmodel`` (a dfqvit QuantizedModel)."""
    fn = _METHODS.get(method)
    if fn is None:
        raise CalibrationError(
            f"unknown calibration method {method!r}; data-free methods: {available_methods()}. "
            f"For real images pass a tensor or a DataLoader as calib= (on the command line: an .npz pack or an "
            f"image folder as --calib)")
    if not hasattr(qmodel, "input_spec") or not hasattr(qmodel, "quantizers"):
        raise CalibrationError(
            f"synthesize needs a dfqvit QuantizedModel, got {type(qmodel).__name__}; wrap a timm model first: "
            "dfqvit.models.adapt(model, QuantConfig(...))")
    check_num_images(num_images)  # gaussian made an empty set of 0 images
    seed = check_seed(seed)
    result = fn(qmodel, num_images=num_images, seed=seed, config=config, progress=progress)
    spec = qmodel.input_spec  # the images live in this normalized space: a model of another one must not use them
    result.config = {**result.config, "normalization": {"mean": list(spec.mean), "std": list(spec.std)}}
    if reads_quantized_model(method):  # made against these quantization settings (a student / adversary)
        result.config["quant"] = quant_settings(qmodel.config)
    return result


# QuantConfig fields the images of a method that reads the quantized model do not depend on
_NOT_IN_QUANT_RECORD = ("calib_images", "check_inputs")


def quant_settings(config) -> Dict[str, Any]:
    """What a method that reads the quantized model depends on: the QuantConfig's fields that shape its quantizers
    (bits, softmax quantizer, patch embedding and image bits, head, percentiles, ...)."""
    return {k: v for k, v in config_to_dict(config)["_data"].items() if k not in _NOT_IN_QUANT_RECORD}
