"""Fused LayerNorm + quantize: Triton vs reference, reference vs F.layer_norm, op, errors.

Tolerance: the kernel and the reference run the same two-pass fp32 LayerNorm, but sum in a different
order, so a value within an ulp of a rounding tie may land on the neighbouring code: codes within 1 of the
reference on at most 0.1% of elements (under the interpreter they have matched exactly).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfqvit.kernels import KernelInputError, reference
from dfqvit.kernels.act_quant import layernorm_quant_triton
from kernel_utils import TRITON_DEVICE, requires_triton

GEN = torch.Generator().manual_seed(5)


def _inputs(shape, dtype):
    c = shape[-1]
    x = (torch.randn(shape, generator=GEN) * 2 + 0.5).to(dtype)
    return x, torch.randn(c, generator=GEN) * 0.5 + 1, torch.randn(c, generator=GEN) * 0.1


@requires_triton
@pytest.mark.parametrize("shape", [(1, 48), (65, 100), (3, 197, 384), (7, 17)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_layernorm_quant_matches_reference(shape, dtype):
    x, w, b = _inputs(shape, dtype)
    args = (1e-6, 0.03, -3, -128, 127)
    expected = reference.layernorm_quant_reference(x, w, b, *args)
    got = layernorm_quant_triton(x.to(TRITON_DEVICE), w.to(TRITON_DEVICE), b.to(TRITON_DEVICE), *args).cpu()
    assert got.dtype == torch.int8 and got.shape == x.shape
    diff = (got.int() - expected.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3
    assert int((expected == 127).sum()) + int((expected == -128).sum()) < expected.numel()  # not all clamped


@requires_triton
def test_layernorm_quant_narrow_range_and_small_block():
    x, w, b = _inputs((33, 100), torch.float32)
    expected = reference.layernorm_quant_reference(x, w, b, 1e-5, 0.1, 0, -8, 7)  # 4-bit signed range
    got = layernorm_quant_triton(x.to(TRITON_DEVICE), w.to(TRITON_DEVICE), b.to(TRITON_DEVICE), 1e-5, 0.1, 0, -8, 7,
                                 block_m=4).cpu()
    assert int(got.min()) >= -8 and int(got.max()) <= 7
    assert int((got.int() - expected.int()).abs().max()) <= 1


def test_reference_layer_norm_equals_torch():
    x, w, b = _inputs((65, 100), torch.float32)
    torch.testing.assert_close(reference.layer_norm_reference(x, w, b, 1e-6), F.layer_norm(x, (100,), w, b, 1e-6),
                               rtol=1e-5, atol=1e-5)
    q = reference.layernorm_quant_reference(x, w, b, 1e-6, 0.05, 2, -128, 127)
    expected = reference.uniform_quantize(F.layer_norm(x, (100,), w, b, 1e-6), 0.05, 2, -128, 127)
    assert int((q.float() - expected).abs().max()) <= 1


def test_layernorm_quant_opcheck():
    x, w, b = _inputs((2, 9, 48), torch.float16)
    torch.library.opcheck(torch.ops.dfqvit.layernorm_quant.default, (x, w, b, 1e-6, 0.03, 0, -128, 127))
    x, w, b = _inputs((5, 100), torch.float32)
    torch.library.opcheck(torch.ops.dfqvit.layernorm_quant.default, (x, w, b, 1e-5, 0.1, -3, -8, 7))


def test_layernorm_quant_errors_say_what_was_given():
    x, w, b = _inputs((5, 48), torch.float32)
    op = torch.ops.dfqvit.layernorm_quant
    with pytest.raises(KernelInputError, match="dtype int8"):
        op(x.to(torch.int8), w, b, 1e-6, 0.1, 0, -128, 127)
    with pytest.raises(KernelInputError, match=r"weight has shape \(47,\)"):
        op(x, w[:47], b, 1e-6, 0.1, 0, -128, 127)
    with pytest.raises(KernelInputError, match="stride"):
        op(torch.randn(48, 5).T, w, b, 1e-6, 0.1, 0, -128, 127)
    with pytest.raises(KernelInputError, match="out_scale=0"):
        op(x, w, b, 1e-6, 0.0, 0, -128, 127)
    with pytest.raises(KernelInputError, match="out_qmax=200"):
        op(x, w, b, 1e-6, 0.1, 0, -128, 200)


def test_layernorm_quant_refuses_mixed_devices_and_abnormal_scales():
    """A meta weight beside CPU tensors gave uninitialized memory; out_scale 1e-42 / 1e39 crashed the interpreted
    kernel with a raw InterpreterError (Triton typed them fp64)."""
    x, w, b = _inputs((3, 8), torch.float32)
    with pytest.raises(KernelInputError, match="weight on meta"):
        torch.ops.dfqvit.layernorm_quant(x, w.to("meta"), b, 1e-5, 0.1, 0, -128, 127)
    for out_scale in (1e-42, 1e39):
        with pytest.raises(KernelInputError, match="normal fp32"):
            layernorm_quant_triton(x, w, b, 1e-5, out_scale, 0, -128, 127)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(KernelInputError, match="eps="):
            layernorm_quant_triton(x, w, b, eps, 0.1, 0, -128, 127)
