"""Work that calibrates or trains (synthesis, calibration, reconstruction, correction) must not depend on the
caller's global torch state."""
from __future__ import annotations

import functools

import torch


def _float32_numerics(fn):
    """Run ``fn`` outside autocast, under the float32 default dtype; give the caller's state back after."""
    @functools.wraps(fn)
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def wrapper(*args, **kwargs):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_default_dtype(previous)
    return wrapper


def calibration_state(fn):
    """Run ``fn`` (which measures the model, it takes no gradients) under float32 numerics, whatever the caller's
    state: a caller's bf16 autocast made the calibration see bf16 activations and give other scales than the same
    call outside it, and torch.set_default_dtype(float64) other scales too. The caller's inference mode stays: the
    calibration updates the model's tensors in place, which inference mode allows on normal tensors and requires
    on a model built inside it (leaving it failed on those: "Inplace update to inference tensor outside
    InferenceMode")."""
    return _float32_numerics(torch.no_grad()(fn))


def training_state(fn):
    """Run ``fn`` with gradients on, outside inference mode and autocast, under the float32 default dtype, and give
    the caller's state back after.

    The synthesis and the reconstruction take gradients: a caller's torch.no_grad() / inference_mode() (usual around
    inference code) must not reach them ("element 0 of tensors does not require grad"), nor make cached block
    inputs inference tensors that autograd cannot save. A caller's autocast made them run in bf16 / fp16 and give
    other images and another model than the same call outside it; a caller's torch.set_default_dtype(float64) made
    the synthesis fail ("Input type (double) and bias type (float)") and other calibrations give another model."""
    return torch.inference_mode(False)(_float32_numerics(torch.enable_grad()(fn)))
