"""The four integer ops a block needs, behind one small interface with three implementations:

* ``TritonKernels``: the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
* ``NativeKernels``: the C++ CPU kernels of ``dfqvit._C`` (AVX-512 VNNI / AVX2 GEMM on weights prepacked
  once into CPU panels, integer log2 attention); LayerNorm+quantize and weight-only layers stay PyTorch;
* ``TorchKernels``: the same math in plain PyTorch (``dfqvit.kernels.reference``), on any device.

Native and torch give identical bits on the CPU (tests/test_kernels_native.py).

Both take int8 activation codes with their ``ActGrid`` and a ``PackedLinear``; neither knows models.
"""
from __future__ import annotations

from typing import Optional

import torch

from dfqvit.errors import DFQViTError, MissingGPUError, UnsupportedModelError
from dfqvit.kernels import (KernelInputError, attention_linear_triton, attention_log2_triton, layernorm_quant_triton,
                            native, qgemm_columns_triton, qgemm_triton, qgemm_w16_triton, reference)
from dfqvit.kernels._common import check_attention_scalars, check_requant_grid, kernel_is_interpreted
from dfqvit.kernels.qgemm import _qgemm_kernel

from .pack import ActGrid, PackedLinear, SoftmaxGrid

BACKENDS = ("auto", "triton", "native", "torch", "fake")


class TorchKernels:
    name = "torch"

    def prepare(self, module: torch.nn.Module) -> None:
        """Once, when the engine is built: convert weights to this backend's layout (PyTorch reads them as packed)."""

    def quantize(self, x: torch.Tensor, grid: ActGrid) -> torch.Tensor:
        """Float activations -> int8 codes on ``grid`` (the shared rounding of ``kernels.reference``)."""
        return reference.quantize_codes(x.float(), grid.scale, grid.zero, grid.qmin, grid.qmax)

    def gemm_codes_per_column(self, a, layer: PackedLinear, grid: torch.Tensor, out_dtype) -> torch.Tensor:
        """``layer`` on int8 ``a``, output re-quantized with one grid per column (``grid`` (5, N): scale, zero,
        qmin, qmax, 1 / scale): the qkv GEMM, whose q, k and v parts have grids of their own."""
        y = self.gemm(a, layer, None, False, None, out_dtype)
        return reference.quantize_codes(y.float(), grid[0], grid[1], grid[2], grid[3])

    def layernorm_quant(self, x, norm, grid: ActGrid) -> torch.Tensor:
        return reference.layernorm_quant_reference(x, norm.weight, norm.bias, norm.eps, grid.scale, grid.zero,
                                                   grid.qmin, grid.qmax)

    def gemm(self, a, layer: PackedLinear, residual, gelu: bool, out: Optional[ActGrid], out_dtype):
        g = layer.act
        return reference.qgemm_reference(a, g.scale, g.zero, layer.data, layer.w_scale, layer.w_zero,
                                         layer.w_col_sums, layer.bias, residual, layer.layout.storage_bits,
                                         layer.k, layer.group_k, gelu, *_out_args(out, out_dtype))

    def gemm_norm(self, a, layer: PackedLinear, residual, out_dtype, norm, grid: ActGrid):
        """(gemm(a) + residual, layernorm_quant of it on ``grid``): a residual branch and the next layer's input."""
        y = self.gemm(a, layer, residual, False, None, out_dtype)
        return y, self.layernorm_quant(y, norm, grid)

    def gemm_w16(self, x, layer: PackedLinear, residual, gelu: bool, out_dtype):
        return reference.qgemm_w16_reference(x, layer.data, layer.w_scale, layer.w_zero, layer.bias, residual,
                                             layer.layout.storage_bits, layer.k, layer.group_k, gelu, out_dtype)

    def attention(self, q, k, v, grids, sm_scale: float, bias, mask, p: SoftmaxGrid, out_dtype):
        qg, kg, vg = grids
        args = (q, k, v, qg.scale, qg.zero, kg.scale, kg.zero, vg.scale, vg.zero, sm_scale, bias, mask)
        if p.log2:
            return reference.attention_log2_reference(*args, p.param, p.bits, out_dtype)
        return reference.attention_linear_reference(*args, p.param, p.zero, p.bits, out_dtype)

    def attention_tokens(self, q, k, v, grids, sm_scale: float, bias, mask, p: SoftmaxGrid, out_dtype,
                         out: Optional[ActGrid]) -> torch.Tensor:
        """Attention as the projection reads it: (B, N, H*d), int8 codes on ``out`` (the codes of the
        ``out_dtype`` result) or ``out_dtype`` when ``out`` is None."""
        batch, heads, seq, dim = q.shape
        o = self.attention(q, k, v, grids, sm_scale, bias, mask, p, out_dtype)
        o = o.transpose(1, 2).reshape(batch, seq, heads * dim)
        return o if out is None else self.quantize(o, out)


class _FusedAttentionTokens:
    """For backends whose ``attention`` takes ``out_grid`` / ``token_major``: one kernel writes the projection's
    input, (B, N, H, d) and, with ``out``, its int8 codes (no transpose copy, no separate quantize pass)."""

    def attention_tokens(self, q, k, v, grids, sm_scale: float, bias, mask, p: SoftmaxGrid, out_dtype,
                         out: Optional[ActGrid]) -> torch.Tensor:
        batch, heads, seq, dim = q.shape
        grid = None if out is None else (out.scale, out.zero, out.qmin, out.qmax)
        o = self.attention(q, k, v, grids, sm_scale, bias, mask, p, out_dtype, out_grid=grid, token_major=True)
        return o.view(batch, seq, heads * dim)


def require_int8_attention_zeros(module: torch.nn.Module, backend: str) -> None:
    """The native and Triton attention kernels take q / k / v zero points in int8 (their exact int16 / int32 sums
    assume it); a grid of one-sign activations lies outside. Refused when the engine is built (an
    UnsupportedModelError: "auto" falls back to the fake-quant model), not on the first forward."""
    from .blocks import Attention

    for name, attention in module.named_modules():
        if not isinstance(attention, Attention):
            continue
        outside = {n: g.zero for n, g in zip("qkv", attention.grids) if g is not None and not -128 <= g.zero <= 127}
        if outside:
            raise UnsupportedModelError(
                f"{name}: {', '.join(f'{n}_zero={z}' for n, z in outside.items())} lies outside int8 (those "
                f"activations have one sign); backend={backend!r} takes int8 zero points. backend='torch' runs it")


def check_native_grids(module: torch.nn.Module) -> None:
    """The numbers of every grid the engine holds, checked once when it is built with the checks the public
    ``native.*`` functions run on every call: NativeKernels calls their ``_*_unchecked`` twins. Every ``ActGrid``
    attribute (PackedLinear.act, whose grids the blocks hand the kernels, and Attention.grids) and each attention's
    zero points and softmax quantizer. They are fixed: frozen dataclasses that no state dict can replace (a state
    dict with other grids does not load, QuantizedViT.set_extra_state). An UnsupportedModelError, as
    ``require_int8_attention_zeros``: "auto" falls back to the fake-quant model."""
    from .blocks import Attention

    for name, m in module.named_modules():
        try:
            for attr, value in vars(m).items():
                for i, grid in enumerate(value if isinstance(value, tuple) else (value,)):
                    if isinstance(grid, ActGrid):
                        where = f"{name}.{attr}".lstrip(".") + (f"[{i}]" if isinstance(value, tuple) else "")
                        check_requant_grid(where, grid.scale, grid.zero, grid.qmin, grid.qmax)
            if isinstance(m, Attention) and m.softmax is not None:
                (qg, kg, vg), p = m.grids, m.softmax
                mode = native.P_MODE_LOG2 if p.log2 else native.P_MODE_LINEAR
                # out_dtype (the residual stream's) is checked on every call
                check_attention_scalars(name, qg.zero, kg.zero, vg.zero, mode, p.param, p.bits, torch.float32)
        except KernelInputError as exc:
            raise UnsupportedModelError(f"{exc} backend='native' takes no such grid; backend='torch' runs it") from None


class NativeKernels(_FusedAttentionTokens, TorchKernels):
    """The C++ kernels through ``native``'s unchecked entry points: ``prepare`` checked the grids they take."""

    name = "native"

    def prepare(self, module: torch.nn.Module) -> None:
        """Check the grids once (``check_native_grids``), convert every PackedLinear of ``module`` to CPU panels
        once (its GPU-layout bytes are dropped)."""
        require_int8_attention_zeros(module, self.name)
        check_native_grids(module)
        for layer in module.modules():
            if isinstance(layer, PackedLinear) and layer.act is not None:
                layer.to_cpu_panels(native.prepack)

    def quantize(self, x: torch.Tensor, grid: ActGrid) -> torch.Tensor:
        return native._quantize_unchecked(x, grid.scale, grid.zero, grid.qmin, grid.qmax)

    def layernorm_quant(self, x, norm, grid: ActGrid) -> torch.Tensor:
        return native._layernorm_quant_unchecked(x, norm.weight, norm.bias, norm.eps, grid.scale, grid.zero,
                                                 grid.qmin, grid.qmax)

    def gemm_codes_per_column(self, a, layer: PackedLinear, grid: torch.Tensor, out_dtype) -> torch.Tensor:
        if out_dtype != torch.float32:  # the fused epilogue re-quantizes the fp32 value
            return super().gemm_codes_per_column(a, layer, grid, out_dtype)
        g = layer.act
        # The checked entry: the grid is a buffer (load_state_dict writes it), checked again after each write.
        return native.qgemm_prepacked_columns(a, g.scale, g.zero, layer.panels, layer.n, layer.w_scale, layer.w_zero,
                                              layer.w_col_sums, layer.bias, layer.layout.storage_bits, layer.k,
                                              grid[:4])  # rows 0-3: scale, zero, qmin, qmax

    def gemm(self, a, layer: PackedLinear, residual, gelu: bool, out: Optional[ActGrid], out_dtype):
        g = layer.act
        return native._qgemm_prepacked_unchecked(a, g.scale, g.zero, layer.panels, layer.n, layer.w_scale,
                                                 layer.w_zero, layer.w_col_sums, layer.bias, residual,
                                                 layer.layout.storage_bits, layer.k, gelu, *_out_args(out, out_dtype))

    def gemm_norm(self, a, layer: PackedLinear, residual, out_dtype, norm, grid: ActGrid):
        if out_dtype != torch.float32:  # the LayerNorm reads the fp32 rows
            return super().gemm_norm(a, layer, residual, out_dtype, norm, grid)
        g = layer.act
        return native._qgemm_prepacked_norm_unchecked(a, g.scale, g.zero, layer.panels, layer.n, layer.w_scale,
                                                      layer.w_zero, layer.w_col_sums, layer.bias, residual,
                                                      layer.layout.storage_bits, layer.k, norm.weight, norm.bias,
                                                      norm.eps, grid.scale, grid.zero, grid.qmin, grid.qmax)

    def attention(self, q, k, v, grids, sm_scale: float, bias, mask, p: SoftmaxGrid, out_dtype, **launch):
        """``launch``: ``out_grid`` / ``token_major`` of :func:`native.attention` (see ``attention_tokens``)."""
        qg, kg, vg = grids
        mode = native.P_MODE_LOG2 if p.log2 else native.P_MODE_LINEAR
        return native._attention_unchecked(q, k, v, qg.scale, qg.zero, kg.scale, kg.zero, vg.scale, vg.zero, sm_scale,
                                           bias, mask, mode, p.param, p.zero, p.bits, out_dtype, **launch)


class TritonKernels(_FusedAttentionTokens, TorchKernels):
    name = "triton"

    def prepare(self, module: torch.nn.Module) -> None:
        require_int8_attention_zeros(module, self.name)

    def layernorm_quant(self, x, norm, grid: ActGrid) -> torch.Tensor:
        return layernorm_quant_triton(x.contiguous(), norm.weight, norm.bias, norm.eps, grid.scale, grid.zero,
                                      grid.qmin, grid.qmax)

    def gemm(self, a, layer: PackedLinear, residual, gelu: bool, out: Optional[ActGrid], out_dtype):
        g = layer.act
        return qgemm_triton(a, g.scale, g.zero, layer.data, layer.w_scale, layer.w_zero, layer.w_col_sums,
                            layer.bias, residual, layer.layout.storage_bits, layer.k, layer.group_k, gelu,
                            *_out_args(out, out_dtype))

    def gemm_codes_per_column(self, a, layer: PackedLinear, grid: torch.Tensor, out_dtype) -> torch.Tensor:
        """Re-quantized per column in the GEMM epilogue (after rounding to ``out_dtype``, as the torch path)."""
        g = layer.act
        return qgemm_columns_triton(a, g.scale, g.zero, layer.data, layer.w_scale, layer.w_zero, layer.w_col_sums,
                                    layer.bias, layer.layout.storage_bits, layer.k, layer.group_k, grid, out_dtype)

    def gemm_w16(self, x, layer: PackedLinear, residual, gelu: bool, out_dtype):
        # The weight-only kernel takes fp16/bf16 activations (exact W - w_zero in fp16, fp32 accumulate).
        x = x if x.dtype in (torch.float16, torch.bfloat16) else x.half()
        return qgemm_w16_triton(x, layer.data, layer.w_scale, layer.w_zero, layer.bias, residual,
                                layer.layout.storage_bits, layer.k, layer.group_k, gelu, out_dtype)

    def attention(self, q, k, v, grids, sm_scale: float, bias, mask, p: SoftmaxGrid, out_dtype, **launch):
        """``launch``: the kernel's ``out_grid`` / ``token_major`` (see ``attention_tokens``)."""
        qg, kg, vg = grids
        args = (q, k, v, qg.scale, qg.zero, kg.scale, kg.zero, vg.scale, vg.zero, sm_scale, bias, mask)
        if p.log2:
            return attention_log2_triton(*args, p.param, p.bits, out_dtype, **launch)
        return attention_linear_triton(*args, p.param, p.zero, p.bits, out_dtype, **launch)


def _out_args(out: Optional[ActGrid], out_dtype):
    """Epilogue arguments: re-quantize to ``out``'s int8 grid, or cast to ``out_dtype``."""
    if out is None:
        return None, 0, 0, 0, out_dtype
    return out.scale, out.zero, out.qmin, out.qmax, torch.int8


def triton_runs_on(device: torch.device) -> bool:
    """CUDA always; CPU only when the kernels were defined under ``TRITON_INTERPRET=1``."""
    return device.type == "cuda" or (device.type == "cpu" and kernel_is_interpreted(_qgemm_kernel))


def native_is_default() -> bool:
    """Whether ``auto`` takes the native kernels on a CPU: when ``dfqvit._C`` is built and runs a vector ISA
    (AVX2 or later). Its scalar rung (CPUs other than x86-64, or without AVX2) exists for correctness: on the
    CIFAR ViT (W4A4, batch 64, Zen 1 VM) it took 4.1 s where the PyTorch backend takes 1.0 s."""
    return native.available() and native.isa() != "scalar"


def select_kernels(backend: str, device: torch.device):
    """The kernel set for ``backend`` on ``device``; ``auto`` = Triton on CUDA, native on a CPU where
    ``dfqvit._C`` is built with a vector ISA, PyTorch otherwise."""
    if backend not in BACKENDS or backend == "fake":
        raise DFQViTError(f"backend={backend!r}; allowed for the engine: 'auto', 'triton', 'native', 'torch' "
                          "('fake' returns the fake-quant model from dfqvit.engine.build_engine)")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else ("native" if native_is_default() else "torch")
    if backend == "triton" and not triton_runs_on(device):
        raise MissingGPUError(
            f"backend='triton' on device {device}: the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 "
            "set before importing dfqvit, to interpret them on the CPU). Use backend='torch' or 'auto' on CPU, "
            "or build the engine from a model on a CUDA device")
    if backend == "native":
        native.require()
        if device.type != "cpu":
            raise DFQViTError(f"backend='native' runs on the CPU, but the model is on {device}; move it with "
                              "model.cpu() or use backend='auto'")
        return NativeKernels()
    return TritonKernels() if backend == "triton" else TorchKernels()
