"""Fused LayerNorm + quantize: fp16/fp32 rows in, int8 codes out, one read of the residual stream.

Math (``reference.layernorm_quant_reference``)::

    mean = sum(x) / C;  var = sum((x - mean)^2) / C;  rstd = 1 / sqrt(var + eps)      (fp32, two-pass)
    y    = (x - mean) * rstd * weight + bias
    out  = clamp(rint(y / out_scale) + out_zero, qmin, qmax)  as int8   (reference.uniform_quantize)

The static per-tensor ``out_scale``/``out_zero`` come from calibration; the int8 output is the next
GEMM's ``A`` with ``a_scale = out_scale`` and ``a_zero = out_zero``. A whole row (C = 384 or 768 for ViT;
any C, not only powers of two) sits in one tile padded to a power of two, so the mean and variance are
single-tile reductions.

The two sums are the reference's ``portable_math.sequential_sum``: fp32 of a float64 sum in index order. fp32 sums
in another order (the interpreter's ``tl.sum`` is numpy's pairwise fp32 sum) moved the mean or the variance by an
ulp in ~30% of random rows, hence y, and a y within an ulp of a rounding tie of ``y / out_scale`` got the
neighbouring code (280.5 -> 281 instead of 280 with a zero point outside int8; inside int8 just as well). So the
kernel sums the reference's way where it can (constexpr ``SEQUENTIAL_SUMS``, set off CUDA): float64 ``tl.cumsum``,
which the interpreter runs as ``np.cumsum`` (``np.add.accumulate``: one add per element in index order), read at
the last column. Under the interpreter the codes equal the reference (and the native kernel) bit for bit.

On a GPU a scan would cost far more than the single-tile tree reduction, so there the sums stay fp32 ``tl.sum``
(a tree; same PTX as before), and the compiler contracts ``(x - mean) * rstd * weight + bias`` into an FMA anyway:
the codes are within one of the reference there (tests/test_kernels_act_quant.py). Zero points past int8: the
rounding of ``uniform_quantize_int`` (kernels/_common.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._common import (check_layernorm_eps, check_requant_grid, check_same_device, check_tensor, next_power_of_2,
                      reciprocal_fp32, require_triton_device, uniform_quantize_int)
from .errors import KernelInputError

MAX_CHANNELS = 16384


@triton.jit
def _row_sum(v, cols, BLOCK_C: tl.constexpr, SEQUENTIAL: tl.constexpr):
    """Sum of each row of the fp32 tile ``v`` (padding columns hold 0). ``SEQUENTIAL``: the reference's
    ``sequential_sum``, fp32 of ``((v0 + v1) + v2) + ...`` in float64, as the last column of a float64 cumsum
    (the interpreter's ``np.cumsum`` adds in index order; the trailing zeros of the padding add nothing). Else
    an fp32 tree (``tl.sum``, the GPU's single-tile reduction)."""
    if SEQUENTIAL:
        running = tl.cumsum(v.to(tl.float64), axis=1)
        return tl.sum(tl.where(cols[None, :] == BLOCK_C - 1, running, 0.0), axis=1).to(tl.float32)
    else:
        return tl.sum(v, axis=1)


@triton.jit
def _layernorm_quant_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, C, C_FLOAT, stride_xm, stride_om,
                            eps, out_scale, out_inv_scale, out_zero, out_qmin, out_qmax,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HW_FMA: tl.constexpr,
                            SEQUENTIAL_SUMS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < C
    ok = row_ok & col_ok
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.math.div_rn(_row_sum(x, cols, BLOCK_C, SEQUENTIAL_SUMS), C_FLOAT)
    centered = tl.where(col_ok, x - mean[:, None], 0.0)
    var = tl.math.div_rn(_row_sum(centered * centered, cols, BLOCK_C, SEQUENTIAL_SUMS), C_FLOAT)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
    weight = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * weight[None, :] + bias[None, :]
    q = uniform_quantize_int(y, out_scale, out_inv_scale, out_zero, out_qmin, out_qmax, HW_FMA)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], q.to(tl.int8), mask=ok)


def check_layernorm_quant_args(entry, x, weight, bias, eps, out_scale, out_zero, out_qmin, out_qmax):
    """Metadata-only checks shared by the op, its fake and the launcher; returns C."""
    check_tensor(entry, "x", x, dtypes=(torch.float16, torch.bfloat16, torch.float32), last_dim_contiguous=True)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise KernelInputError(f"{entry}: x has shape {tuple(x.shape)}; it needs a last (channel) dimension >= 1.")
    c = x.shape[-1]
    if c > MAX_CHANNELS:
        raise KernelInputError(f"{entry}: C={c} channels; one row must fit a tile, allowed C <= {MAX_CHANNELS}.")
    check_tensor(entry, "weight", weight, dtypes=(torch.float16, torch.bfloat16, torch.float32), shape=(c,),
                 contiguous=True)
    check_tensor(entry, "bias", bias, dtypes=(torch.float16, torch.bfloat16, torch.float32), shape=(c,),
                 contiguous=True)
    check_same_device(entry, (("x", x), ("weight", weight), ("bias", bias)))
    check_layernorm_eps(entry, eps)
    check_requant_grid(entry, out_scale, out_zero, out_qmin, out_qmax)
    return c


def layernorm_quant_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           out_scale: float, out_zero: int, out_qmin: int, out_qmax: int,
                           block_m: int | None = None) -> torch.Tensor:
    """Run the Triton LayerNorm+quantize (CUDA, or CPU under ``TRITON_INTERPRET=1``) on x (..., C)."""
    entry = "layernorm_quant_triton"
    c = check_layernorm_quant_args(entry, x, weight, bias, eps, out_scale, out_zero, out_qmin, out_qmax)
    device = require_triton_device(entry, _layernorm_quant_kernel, [x, weight, bias])
    x2 = x.reshape(-1, c)
    m = x2.shape[0]
    out = torch.empty((m, c), dtype=torch.int8, device=x.device)
    if m:
        block_c = next_power_of_2(c)
        # ~4K elements per program keeps registers bounded on the GPU; the interpreter likes big tiles too.
        block_m = block_m or max(1, min(16, 4096 // block_c))
        _layernorm_quant_kernel[(triton.cdiv(m, block_m),)](
            x2, weight, bias, out, m, c, float(c), x2.stride(0), out.stride(0), float(eps), float(out_scale),
            reciprocal_fp32(out_scale), float(out_zero), float(out_qmin), float(out_qmax), BLOCK_M=block_m,
            BLOCK_C=block_c, HW_FMA=device.type == "cuda", SEQUENTIAL_SUMS=device.type != "cuda",
            num_warps=4 if block_c >= 512 else 2)
    return out.reshape(x.shape)


@torch.library.custom_op("dfqvit::layernorm_quant", mutates_args=())
def layernorm_quant_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_scale: float,
                       out_zero: int, out_qmin: int, out_qmax: int) -> torch.Tensor:
    """LayerNorm over the last dim, then int8 quantization; CPU implementation = the reference."""
    check_layernorm_quant_args("dfqvit::layernorm_quant", x, weight, bias, eps, out_scale, out_zero, out_qmin,
                               out_qmax)
    return reference.layernorm_quant_reference(x, weight, bias, eps, out_scale, out_zero, out_qmin, out_qmax)


@layernorm_quant_op.register_kernel("cuda")
def _layernorm_quant_cuda(x, weight, bias, eps, out_scale, out_zero, out_qmin, out_qmax):
    return layernorm_quant_triton(x, weight, bias, eps, out_scale, out_zero, out_qmin, out_qmax)


@layernorm_quant_op.register_fake
def _layernorm_quant_fake(x, weight, bias, eps, out_scale, out_zero, out_qmin, out_qmax):
    check_layernorm_quant_args("dfqvit::layernorm_quant", x, weight, bias, eps, out_scale, out_zero, out_qmin,
                               out_qmax)
    return x.new_empty(x.shape, dtype=torch.int8)
