"""Helpers for the kernel tests (tests/test_kernels_*.py): where Triton runs, SQNR, random operands."""
from __future__ import annotations

import pytest
import torch

from dfqvit.kernels._common import kernel_is_interpreted
from dfqvit.kernels.qgemm import _qgemm_kernel

# Where the Triton kernels run in this process: compiled on CUDA, interpreted on CPU, or nowhere.
if torch.cuda.is_available():
    TRITON_DEVICE = "cuda"
elif kernel_is_interpreted(_qgemm_kernel):
    TRITON_DEVICE = "cpu"
else:
    TRITON_DEVICE = None
INTERPRETED = TRITON_DEVICE == "cpu"

requires_triton = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="no CUDA and TRITON_INTERPRET=1 was not set before dfqvit was imported")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """20 log10(||x|| / ||x - y||) in dB (torchao's compute_error); inf when equal."""
    reference, approx = reference.double(), approx.double()
    noise = (reference - approx).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(reference.norm() / noise))


def random_weight(bits: int, n: int, k: int, generator: torch.Generator):
    """(codes, w_scale, w_zero) as a per-channel quantizer would give them; every code value occurs."""
    if bits == 8:
        codes = torch.randint(-128, 128, (n, k), generator=generator).to(torch.int8)
        zero = torch.randint(-30, 30, (n,), generator=generator).to(torch.int32)
    else:
        codes = torch.randint(0, 2 ** bits, (n, k), generator=generator)
        present = min(codes.numel(), 2 ** bits)
        codes.view(-1)[:present] = torch.arange(present)  # all values present (when there is room)
        codes = codes.to(torch.uint8 if bits <= 4 else torch.int8)
        zero = torch.randint(0, 2 ** bits, (n,), generator=generator).to(torch.int32)
    scale = torch.rand(n, generator=generator) * 0.01 + 0.001
    return codes, scale, zero


def random_int8(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=generator).to(torch.int8)
