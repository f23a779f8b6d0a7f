"""Real images for evaluation and the "real data" baseline: the npz format of ../shared/data
(JPEG bytes + offsets + labels) or an image folder (one sub-folder per class)."""
from __future__ import annotations

import io
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dfqvit.errors import CheckpointNotFoundError, DFQViTError

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageDataset(torch.utils.data.Dataset):
    """Decoded lazily; returns (normalized (3, H, W) float tensor, label)."""

    def __init__(self, loaders: List, labels: Sequence[int], size: Tuple[int, int],
                 mean: Sequence[float], std: Sequence[float], classes: Optional[Sequence[str]] = None,
                 names: Optional[Sequence[str]] = None):
        self.loaders, self.labels = loaders, list(labels)
        self.names = list(names) if names is not None else [f"image {i}" for i in range(len(self.labels))]
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def _open(self, i: int) -> Image.Image:
        try:
            return self.loaders[i]()
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise DFQViTError(f"{self.names[i]} cannot be read as an image ({type(exc).__name__}: {exc}); remove "
                              "or replace it") from None

    def verify(self, progress: bool = False) -> None:
        """Open every image's header (no pixel decoding, so fast): a file that is not an image is named here,
        before long work, rather than when it is first decoded."""
        for i in tqdm(range(len(self)), desc="checking images", disable=not progress, leave=False):
            self._open(i)

    def __getitem__(self, i: int):
        image = self._open(i)
        try:
            image = _as_rgb(image)
        except (OSError, ValueError, SyntaxError, DFQViTError) as exc:  # a damaged body shows only when decoded
            raise DFQViTError(f"{self.names[i]} cannot be decoded ({type(exc).__name__}: {exc}); remove or "
                              "replace it") from None
        if image.size != (self.size[1], self.size[0]):
            image = image.resize((self.size[1], self.size[0]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std, self.labels[i]


def _as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grayscale (PNG "I;16" / "I") is scaled to 8 bits first: PIL's convert("RGB") clips it at
    255, so almost every pixel came out white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        raise DFQViTError("floating-point images (PIL mode F) have no fixed range; save them as 8-bit images")
    return image.convert("RGB")


NPZ_KEYS = ("blob", "offsets", "labels")  # JPEG bytes, their offsets, class labels (../shared/data/README.md)


def _array_loaders(path: str, images: np.ndarray, labels: np.ndarray):
    """As _npz_loaders, for an .npz holding decoded ``images`` (uint8, (N, H, W, 3) or (N, H, W)) and ``labels``."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DFQViTError(f"{path!r}: images of dtype {images.dtype} and shape {images.shape}; expected uint8 "
                          "(N, H, W, 3) or (N, H, W) pixels 0..255")
    if labels.shape != (images.shape[0],):
        raise DFQViTError(f"{path!r}: {images.shape[0]} images but labels of shape {labels.shape}")
    pixels = images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images
    loaders = [(lambda i=i: Image.fromarray(pixels[i])) for i in range(len(labels))]
    return loaders, _class_labels(path, labels), None, None


def _class_labels(path: str, labels: np.ndarray) -> List[int]:
    """Labels as ints; floats were truncated (0.7 -> 0) and strings raised numpy's error."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DFQViTError(f"{path!r}: labels of dtype {labels.dtype} and shape {labels.shape}; expected one "
                          "integer class index per image")
    return labels.astype(np.int64).tolist()


def _npz_loaders(path: str):
    """(loaders, labels, class names or None, None: the images have no file names of their own)."""
    try:
        data = np.load(path, allow_pickle=False)
        keys = list(getattr(data, "files", []))
        if "images" in keys and "labels" in keys:
            return _array_loaders(path, data["images"], data["labels"])
        if not all(k in keys for k in NPZ_KEYS):
            raise DFQViTError(f"{path!r} holds {keys or 'a single array'}; an image pack needs the keys "
                              f"{', '.join(NPZ_KEYS)} (../shared/data/README.md) or images (uint8, N x H x W x 3) "
                              "and labels, or give an image folder")
        blob, offsets, labels = (data[k] for k in NPZ_KEYS)
    except (ValueError, OSError, EOFError) as exc:  # numpy's message talks of allow_pickle for any non-npz bytes
        raise DFQViTError(f"{path!r} is not a readable .npz image pack ({type(exc).__name__}); give an .npz "
                          "with blob, offsets, labels, or an image folder") from exc
    classes = [str(c) for c in data["classes"]] if "classes" in data else None
    labels = _class_labels(path, labels)
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) != len(labels) + 1:
        raise DFQViTError(f"{path!r}: {len(labels)} labels need {len(labels) + 1} integer offsets into the blob, "
                          f"got {offsets.dtype} of shape {offsets.shape}")
    loaders = [(lambda a=int(offsets[i]), b=int(offsets[i + 1]): Image.open(io.BytesIO(blob[a:b].tobytes())))
               for i in range(len(labels))]
    return loaders, labels, classes, None


def _class_images(folder: str) -> List[str]:
    """The image files of one class folder, its sub-folders included (as torchvision's ImageFolder), sorted; hidden
    files and folders are left out."""
    found = []
    for here, subfolders, files in os.walk(folder, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [os.path.join(here, f) for f in sorted(files)
                  if f.lower().endswith(_IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def _folder_loaders(root: str):
    """(loaders, labels, class names, file names to show in errors)."""
    # Hidden folders (.ipynb_checkpoints, .git) are not classes: one shifted every label after it.
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise DFQViTError(f"image folder {root!r} has no class sub-folders (expected root/<class>/<image>)")
    loaders, labels, names = [], [], []
    for label, name in enumerate(classes):
        files = _class_images(os.path.join(root, name))
        if not files:  # as torchvision's ImageFolder: a class without images would still take a label
            raise DFQViTError(f"class folder {os.path.join(root, name)!r} holds no {', '.join(_IMAGE_EXTENSIONS)} "
                              "images; remove it or add its images (every sub-folder is a class, in sorted order)")
        for path in files:
            loaders.append(lambda p=path: Image.open(p))
            names.append(repr(path))
            labels.append(label)
    return loaders, labels, classes, names


def load_images(path: str, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                limit: Optional[int] = None) -> ImageDataset:
    """Dataset of normalized images from an ``.npz`` pack or an image folder; ``limit`` keeps an
    evenly spread subset (every k-th image, so all classes stay represented)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"image data {path!r} does not exist")
    if limit is not None and limit < 1:
        raise DFQViTError(f"limit={limit}: give at least 1 image (--limit), or none for all")
    if path.endswith(".npz"):
        loaders, labels, classes, names = _npz_loaders(path)
    elif os.path.isdir(path):
        loaders, labels, classes, names = _folder_loaders(path)
    else:
        raise DFQViTError(f"image data {path!r} is a file, not an .npz pack or an image folder: put images in "
                          "root/<class>/<image> folders (one image: root/any/<image>)")
    if not labels:
        raise DFQViTError(f"image data {path!r} holds no images (an .npz pack, or root/<class>/<image> with "
                          f"{', '.join(_IMAGE_EXTENSIONS)} files)")
    names = names or [f"image {i} of {path!r}" for i in range(len(labels))]
    if limit is not None and limit < len(labels):
        keep = np.linspace(0, len(labels) - 1, limit).round().astype(int)
        loaders, labels, names = [loaders[i] for i in keep], [labels[i] for i in keep], [names[i] for i in keep]
    return ImageDataset(loaders, labels, size, mean, std, classes, names)


def stack_images(dataset: ImageDataset, count: int) -> torch.Tensor:
    """The first ``count`` images as one (count, 3, H, W) tensor (calibration batches)."""
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def is_image_batch(x) -> bool:
    """A (B, C, H, W) tensor or array (anything with ``__array__``)."""
    return hasattr(x, "__array__") and getattr(x, "ndim", 0) == 4


def _is_image(x) -> bool:
    return (isinstance(x, torch.Tensor) or isinstance(x, np.ndarray)) and x.ndim == 3


def _is_image_list(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_image(t) for t in x)


def images_and_labels(pair) -> Optional[Tuple[torch.Tensor, object]]:
    """``(images, labels)`` given as one pair — images a tensor / array or a list of (C, H, W) tensors / arrays,
    labels a tensor / array or a list of scalars — as (one images tensor, the labels as given); None for anything
    else (e.g. a Dataset of two (image, label) samples). Images of different sizes are named."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        return None
    images, labels = pair
    # a list of class indices (ints, 0-d tensors / arrays, strings to be named later) or of one-hot / (1,) rows
    scalars = isinstance(labels, (list, tuple)) and not _is_image_list(labels) and \
        all(isinstance(v, str) or np.ndim(v) <= 1 for v in labels)
    label_array = hasattr(labels, "__array__") and getattr(labels, "ndim", 0) in (1, 2)  # (B,) or (B, 1): not 2 batches
    if not ((is_image_batch(images) or _is_image_list(images)) and (label_array or scalars)):
        return None
    if _is_image_list(images):
        shapes = sorted({tuple(t.shape) for t in images})
        if len(shapes) > 1:
            raise DFQViTError(f"images of different sizes {shapes[:4]}; resize them to one size (e.g. torchvision "
                              "Resize + CenterCrop)")
        images = torch.stack([torch.as_tensor(t) for t in images])
    return torch.as_tensor(images), labels
