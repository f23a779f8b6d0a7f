"""Top-1 accuracy and agreement between two models, with a progress bar."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from dfqvit.data import images_and_labels
from dfqvit.errors import DFQViTError


@dataclasses.dataclass(frozen=True)
class EvalResult:
    top1: float              # percent
    images: int
    agreement: Optional[float] = None  # percent of images where top-1 matches the reference model


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 128, reference=None, device="cpu", progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Top-1 of ``model`` on ``dataset``; with ``reference``, also its top-1 agreement with it.

    ``dataset``: a Dataset of ``(image, label)`` (as ``dfqvit.data.load_images`` gives; an IterableDataset too), a
    DataLoader that yields ``(images, labels)`` batches (``batch_size`` is then the loader's), or ``(images,
    labels)``: two tensors / arrays, images also as a list of (C, H, W) tensors, labels as a list. Labels are class
    indices."""
    from dfqvit.api import resolve_device

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DFQViTError(f"batch size {batch_size!r}: it must be an int >= 1 (--batch-size)")
    device = resolve_device(device)  # "cuda" without a GPU was torch's "Found no NVIDIA driver"
    if isinstance(dataset, (tuple, list)) and len(dataset) != 2 and dataset \
            and all(isinstance(t, torch.Tensor) for t in dataset):
        raise DFQViTError(f"evaluation data of {len(dataset)} tensors; give two, (images, labels)")
    pair = images_and_labels(dataset)
    if pair is not None:
        dataset = _tensor_pair(*pair)
    if isinstance(dataset, torch.utils.data.DataLoader):
        loader = dataset
    elif isinstance(dataset, torch.utils.data.IterableDataset):  # no len(): batched as it streams
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())
    elif isinstance(dataset, torch.utils.data.Dataset) or hasattr(dataset, "__getitem__"):
        if len(dataset) == 0:
            raise DFQViTError("the evaluation data holds no images")
        # its own generator: the loader's base seed was drawn from (and moved) the caller's global RNG
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                             generator=torch.Generator())
    else:
        raise DFQViTError(f"evaluation data of type {type(dataset).__name__}: give a Dataset of (image, label) "
                          "(dfqvit.data.load_images) or a DataLoader of (images, labels)")
    # A model left in training mode ran its dropout: three calls on the same data gave three top-1 figures.
    modes = [(m, m.training) for m in (model, reference) if isinstance(m, torch.nn.Module)]
    for m, _ in modes:
        m.eval()
    try:
        return _score(model, loader, reference, device, progress, desc)
    finally:
        for m, training in modes:
            m.train(training)


def _tensor_pair(images: torch.Tensor, labels) -> torch.utils.data.TensorDataset:
    """(images, labels) of one length; labels a tensor, array or list of class indices."""
    try:
        if isinstance(labels, (list, tuple)):  # of 0-d arrays too, which torch.as_tensor cannot take
            labels = np.asarray(labels)
        labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as exc:  # strings, ragged lists
        raise DFQViTError(f"labels {str(labels)[:60]} are not class indices (integers, one per image)") from exc
    if images.dim() == 0 or labels.dim() == 0 or images.shape[0] != labels.shape[0]:
        raise DFQViTError(f"{tuple(images.shape)} images and {tuple(labels.shape)} labels: give one label per image "
                          "(the first dimensions must match)")
    return torch.utils.data.TensorDataset(images, labels)


def _score(model, loader, reference, device: torch.device, progress: bool, desc: str) -> EvalResult:
    correct = agree = total = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = _images_and_labels(batch)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        _check_label_range(y, logits.shape[-1])
        pred = logits.argmax(dim=-1)
        correct += int((pred == y).sum())
        if reference is not None:
            ref_logits = reference(x)
            if ref_logits.shape[-1] != logits.shape[-1]:
                raise DFQViTError(f"the reference model has {ref_logits.shape[-1]} classes and the model "
                                  f"{logits.shape[-1]}: top-1 agreement between them means nothing")
            agree += int((pred == ref_logits.argmax(dim=-1)).sum())
        total += y.numel()
    if total == 0:
        raise DFQViTError("the evaluation data holds no images")
    return EvalResult(top1=100.0 * correct / max(total, 1), images=total,
                      agreement=100.0 * agree / max(total, 1) if reference is not None else None)


def _images_and_labels(batch):
    """(images (B, C, H, W), labels (B,) class indices) of one batch; anything else is named (labels of shape
    (B, 1) or one-hot (B, C) broadcast against the predictions and gave top-1 figures of 100% or 0%)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DFQViTError(f"evaluation batches must be (images, labels) pairs; got {type(batch).__name__}")
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DFQViTError(f"evaluation batch of ({type(x).__name__}, {type(y).__name__}); expected two tensors")
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.dtype == torch.bool:
        raise DFQViTError(f"labels of shape {tuple(y.shape)} and dtype {y.dtype} for {x.shape[0]} images; expected "
                          "one class index per image (integers, shape (B,)); for one-hot labels pass "
                          "labels.argmax(-1)")
    return x, y


def _check_label_range(labels: torch.Tensor, classes: int) -> None:
    """Labels outside the model's classes can never match: top-1 came out 0% without a word (e.g. ImageNet
    labels on a 10-class model)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise DFQViTError(f"labels run from {int(labels.min())} to {int(labels.max())} but the model has {classes} "
                          f"classes (0..{classes - 1}); the data does not belong to this model's label set")
