"""Work that trains (synthesis, reconstruction) must not depend on the caller's global torch state."""
from __future__ import annotations

import functools

import torch


def training_state(fn):
    """Run ``fn`` with gradients on, outside inference mode and autocast, under the float32 default dtype, and give
    the caller's state back after.

    The synthesis and the reconstruction take gradients: a caller's torch.no_grad() / inference_mode() (usual around
    inference code) must not reach them ("element 0 of tensors does not require grad"), nor make cached block
    inputs inference tensors that autograd cannot save. A caller's autocast made them run in bf16 / fp16 and give
    other images and another model than the same call outside it; a caller's torch.set_default_dtype(float64) made
    the synthesis fail ("Input type (double) and bias type (float)") and other calibrations give another model."""
    @functools.wraps(fn)
    @torch.inference_mode(False)
    @torch.enable_grad()
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
