"""Shared fixtures: tiny timm models built in code, paths to ../shared, and the SQNR helper."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

# Triton fixes compiled-vs-interpreted when a kernel is defined (on import of dfqvit.kernels), so the
# interpreter must be requested before any test module imports dfqvit: without CUDA, the kernel tests
# run the real Triton kernels on CPU tensors under TRITON_INTERPRET=1.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_MODEL_JSON = SHARED / "models" / "vit_mini_c10.json"
CIFAR_TEST = SHARED / "data" / "cifar10_test_even.npz"
CIFAR_TRAIN = SHARED / "data" / "cifar10_train_1k.npz"


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20·log10(‖x‖ / ‖x − y‖) in dB (torchao's compute_error)."""
    reference, approx = reference.double(), approx.double()
    return float(20 * torch.log10(reference.norm() / (reference - approx).norm().clamp_min(1e-30)))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@contextlib.contextmanager
def float64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# Global torch states an inference script may hold around a public dfqvit call.
CALLER_STATES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
                 "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                 "float64_default": float64_default_dtype}

def tiny_vit(**overrides):
    from timm.models.vision_transformer import VisionTransformer
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return VisionTransformer(**kwargs).eval()


def tiny_deit_distilled(**overrides):
    from timm.models.deit import VisionTransformerDistilled
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return VisionTransformerDistilled(**kwargs).eval()


def tiny_swin(**overrides):
    from timm.models.swin_transformer import SwinTransformer
    kwargs = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                  num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return SwinTransformer(**kwargs).eval()


TINY_MODELS = {
    "vit": tiny_vit,
    "vit_avgpool": lambda: tiny_vit(class_token=False, global_pool="avg"),
    "deit_distilled": tiny_deit_distilled,
    "swin": tiny_swin,
}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    return request.param, TINY_MODELS[request.param]()


def load_cifar_model():
    """(model, (mean, std)) of the trained CIFAR-10 reference ViT, or skip the test when absent."""
    if not CIFAR_MODEL_JSON.exists():
        pytest.skip(f"reference model not found at {CIFAR_MODEL_JSON}")
    from dfqvit.models.loading import load_model
    return load_model(str(CIFAR_MODEL_JSON))


def load_cifar_images(norm, test_images: int = 500):
    """(32 real calibration images, test dataset, its images stacked) of the shared CIFAR-10 files in the
    reference model's normalization, or skip the test when the files are absent."""
    if not (CIFAR_TEST.exists() and CIFAR_TRAIN.exists()):
        pytest.skip("CIFAR-10 images not found")
    from dfqvit.data import load_images, stack_images

    calib = stack_images(load_images(str(CIFAR_TRAIN), (32, 32), *norm, limit=32), 32)
    test = load_images(str(CIFAR_TEST), (32, 32), *norm, limit=test_images)
    return calib, test, torch.stack([test[i][0] for i in range(len(test))])
