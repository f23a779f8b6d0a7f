"""The four integer ops a block needs, behind one small interface with two implementations:

* ``TritonKernels``: the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
* ``TorchKernels``: the same math in plain PyTorch (``dfqvit.kernels.reference``, which is also the CPU
  implementation of the ``torch.ops.dfqvit`` ops), on any device.

Both take int8 activation codes with their ``ActGrid`` and a ``PackedLinear``; neither knows models.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from dfqvit.errors import DFQViTError, MissingGPUError
from dfqvit.kernels import (attention_linear_triton, attention_log2_triton, layernorm_quant_triton,
                            qgemm_triton, qgemm_w16_triton, reference)
from dfqvit.kernels._common import kernel_is_interpreted
from dfqvit.kernels.qgemm import INTERPRETER_CONFIG, _qgemm_kernel

from .pack import ActGrid, PackedLinear, SoftmaxGrid

BACKENDS = ("auto", "triton", "torch", "fake")


class TorchKernels:
    name = "torch"

    def layernorm_quant(self, x, norm, grid: ActGrid) -> torch.Tensor:
        return reference.layernorm_quant_reference(x, norm.weight, norm.bias, norm.eps, grid.scale, grid.zero,
                                                   grid.qmin, grid.qmax)

    def gemm(self, a, layer: PackedLinear, residual, gelu: bool, out: Optional[ActGrid], out_dtype):
        g = layer.act
        return reference.qgemm_reference(a, g.scale, g.zero, layer.data, layer.w_scale, layer.w_zero,
                                         layer.w_col_sums, layer.bias, residual, layer.layout.storage_bits,
                                         layer.k, layer.group_k, gelu, *_out_args(out, out_dtype))

    def gemm_w16(self, x, layer: PackedLinear, residual, gelu: bool, out_dtype):
        return reference.qgemm_w16_reference(x, layer.data, layer.w_scale, layer.w_zero, layer.bias, residual,
                                             layer.layout.storage_bits, layer.k, layer.group_k, gelu, out_dtype)

    def attention(self, q, k, v, grids, sm_scale: float, bias, mask, p: SoftmaxGrid, out_dtype):
        qg, kg, vg = grids
        args = (q, k, v, qg.scale, qg.zero, kg.scale, kg.zero, vg.scale, vg.zero, sm_scale, bias, mask)
        if p.log2:
            return reference.attention_log2_reference(*args, p.param, p.bits, out_dtype)
        return reference.attention_linear_reference(*args, p.param, p.zero, p.bits, out_dtype)


class TritonKernels(TorchKernels):
    name = "triton"

    def layernorm_quant(self, x, norm, grid: ActGrid) -> torch.Tensor:
        return layernorm_quant_triton(x.contiguous(), norm.weight, norm.bias, norm.eps, grid.scale, grid.zero,
                                      grid.qmin, grid.qmax)

    def gemm(self, a, layer: PackedLinear, residual, gelu: bool, out: Optional[ActGrid], out_dtype):
        g = layer.act
        return qgemm_triton(a, g.scale, g.zero, layer.data, layer.w_scale, layer.w_zero, layer.w_col_sums,
                            layer.bias, residual, layer.layout.storage_bits, layer.k, layer.group_k, gelu,
                            *_out_args(out, out_dtype), config=_interpreter_config(a, layer))

    def gemm_w16(self, x, layer: PackedLinear, residual, gelu: bool, out_dtype):
        # The weight-only kernel takes fp16/bf16 activations (exact W - w_zero in fp16, fp32 accumulate).
        x = x if x.dtype in (torch.float16, torch.bfloat16) else x.half()
        return qgemm_w16_triton(x, layer.data, layer.w_scale, layer.w_zero, layer.bias, residual,
                                layer.layout.storage_bits, layer.k, layer.group_k, gelu, out_dtype,
                                config=_interpreter_config(x, layer))

    def attention(self, q, k, v, grids, sm_scale: float, bias, mask, p: SoftmaxGrid, out_dtype):
        qg, kg, vg = grids
        args = (q, k, v, qg.scale, qg.zero, kg.scale, kg.zero, vg.scale, vg.zero, sm_scale, bias, mask)
        if p.log2:
            return attention_log2_triton(*args, p.param, p.bits, out_dtype)
        return attention_linear_triton(*args, p.param, p.zero, p.bits, out_dtype)


def _interpreter_config(a: torch.Tensor, layer: PackedLinear):
    """None on CUDA (autotune). Interpreted on CPU: the small default tiles, with BLOCK_K covering a whole
    packing group (int3 packs 128 K positions per group, more than the default BLOCK_K of 64)."""
    if a.device.type == "cuda":
        return None
    return dataclasses.replace(INTERPRETER_CONFIG, block_k=max(INTERPRETER_CONFIG.block_k, layer.group_k))


def _out_args(out: Optional[ActGrid], out_dtype):
    """Epilogue arguments: re-quantize to ``out``'s int8 grid, or cast to ``out_dtype``."""
    if out is None:
        return None, 0, 0, 0, out_dtype
    return out.scale, out.zero, out.qmin, out.qmax, torch.int8


def triton_runs_on(device: torch.device) -> bool:
    """CUDA always; CPU only when the kernels were defined under ``TRITON_INTERPRET=1``."""
    return device.type == "cuda" or (device.type == "cpu" and kernel_is_interpreted(_qgemm_kernel))


def select_kernels(backend: str, device: torch.device):
    """The kernel set for ``backend`` on ``device``; ``auto`` = Triton on CUDA, PyTorch elsewhere."""
    if backend not in BACKENDS or backend == "fake":
        raise DFQViTError(f"backend={backend!r}; allowed for the engine: 'auto', 'triton', 'torch' "
                          "('fake' returns the fake-quant model from dfqvit.engine.build_engine)")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not triton_runs_on(device):
        raise MissingGPUError(
            f"backend='triton' on device {device}: the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 "
            "set before importing dfqvit, to interpret them on the CPU). Use backend='torch' or 'auto' on CPU, "
            "or build the engine from a model on a CUDA device")
    return TritonKernels() if backend == "triton" else TorchKernels()
