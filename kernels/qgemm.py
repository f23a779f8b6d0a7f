"""Packed low-bit GEMM: ``y = A @ W^T`` with int8 activations and int4 / int3 / int8 weights, plus the
weight-only variant with fp16/bf16 activations (W4A16, W3A16).

Math (``reference.qgemm_reference`` is the same, in PyTorch)::

    acc[m, n] = sum_k (A[m, k] - a_zero) * (W[n, k] - w_zero[n])          exact int32
    y = fp32(acc) * (a_scale * w_scale[n]) + bias[n] -> GELU? -> + residual? -> int8 re-quantize? / cast

How the kernel is organised, and why:

* Hopper has no int4 MMA, so packed weights are unpacked in registers to int8 and fed to the int8 tensor
  cores with int32 accumulation (exact). The packing layouts (``packing.PackedLayout``) put K positions
  j and j + G/2 (int4) or j + f*G/4 (int3) in one byte, so a tile of packed bytes becomes 2 (int4) or 4
  (int3) contiguous K-pieces with one shift and one mask each: no shuffles. Each piece goes to its own
  ``tl.dot`` against the matching columns of A, which is just a different address pattern for A.
* For int4/int3 the weight zero point is subtracted during the unpack (``W - w_zero`` fits int8), so the
  only correction left is ``- a_zero * w_col_sums[n]`` with column sums precomputed at pack time. For int8
  weights ``W - w_zero`` may not fit int8, so the kernel sums the rows of A on the fly instead.
* Hiding the unpack (KERNELS.md measured a naive unpack-in-loop W4A8 at 0.57-0.69x of plain int8): the
  unpack costs O(BLOCK_K * BLOCK_N) integer ops per K step against O(BLOCK_M * BLOCK_N * BLOCK_K) MMA work,
  so large BLOCK_M amortises it; the packed tiles are half/three-eighths the bytes of int8, so more
  pipeline stages fit in shared memory; the autotuner picks per M bucket. Measured inside the DeiT-S engine
  on an H200 (batch 64, quick autotune): ~170 int8 TOPS, slower than the cuBLAS fp16 GEMMs of the same model;
  ``benchmarks/kernels.py`` compares it alone with cuBLAS fp16 and fp8 ``_scaled_mm`` (not yet run on a GPU).
* Unpack-first path, from M >= ``UNPACK_FIRST_MIN_M`` rows (1024: batch 6 and up at 197 tokens): a small
  kernel (``packing.unpack_centered_triton``) writes the dense ``W - w_zero`` (int8; fp16/bf16 for weight-only)
  into a transient (N, K) buffer and the same kernel runs as a plain GEMM on it (``W_DENSE``: no unpack, no
  row sums). Why: compiled for sm_90 (``compile_check``; TTGIR), the fused path's K loop reads each packed
  tile from shared memory into registers, unpacks it and writes it back to shared memory for every ``tl.dot``
  (wgmma takes B from shared memory), while the dense one feeds both operands straight from the pipelined
  copies. Neither overlaps its int8 wgmma with the next K step (Triton only makes fp32-accumulator wgmma
  async; an int32 one is followed by a wait), so the per-step unpack shows in full. The GEMM is compute bound
  at these M, so an extra pass over N x K bytes costs little there; at batch 1 (M = 197) reading 4-bit
  weights is what saves time and the fused path stays. The persistent weights stay packed; the buffer is
  one layer's N x K (int8, or 2 bytes for weight-only), freed after the call. Not yet measured on a GPU:
  ``benchmarks/kernels.py`` times both paths (``*_fused``, ``*_unpack_first``) side by side.
* Split-K for tiny M is not implemented: ViT rows are batch x 197 >= 197, enough tiles at batch >= 8.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._common import (ZERO_POINT_BOUND, check_int_range, check_requant_columns, check_requant_grid, check_same_device,
                      check_tensor, gelu_erf, m_bucket, reciprocal_fp32, require_triton_device,
                      torch_dtype_to_triton, uniform_quantize_int)
from .errors import KernelInputError
from .packing import PackedWeight, unpack_centered_triton

# From this many rows M, int4/int3 weights are unpacked to int8 before the GEMM instead of inside it (the
# GEMM is compute bound there; below it, reading 4-bit weights is what saves time). DFQVIT_UNPACK_FIRST_MIN_M
# overrides it, GemmConfig.unpack_first forces a path.
UNPACK_FIRST_MIN_M = 1024

# Epilogue modes (constexpr): what the kernel writes.
EPILOGUE_FLOAT = 0  # y cast to the output dtype
EPILOGUE_REQUANT = 1  # uniform_quantize(y, out_scale, out_zero, qmin, qmax) as int8
EPILOGUE_ACCUMULATOR = 2  # the raw int32 accumulator (zero points corrected), for exact tests
EPILOGUE_REQUANT_COLUMNS = 3  # y rounded to ROUND_DTYPE, then re-quantized with one grid per column (qkv)


@dataclass(frozen=True)
class GemmConfig:
    """Fixed launch configuration (tests, debugging); ``None`` means autotune on CUDA.

    ``block_k`` must be a multiple of the weight's ``group_k`` for int4/int3 storage (unless the weight is
    unpacked first).
    """

    block_m: int = 32
    block_n: int = 32
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    unpack_first: Optional[bool] = None  # None: by M (see use_unpack_first); True/False force a path


# Interpreter default: big enough that numpy does the work, small enough for dims 16..128.
INTERPRETER_CONFIG = GemmConfig(block_m=32, block_n=32, block_k=64, group_m=4, num_warps=1, num_stages=1)


def interpreter_config(group_k: int) -> GemmConfig:
    """The interpreter default for a weight packed in groups of ``group_k``: BLOCK_K must cover whole packing groups
    (int3 packs 128 K positions per group by default, more than INTERPRETER_CONFIG's 64)."""
    return replace(INTERPRETER_CONFIG, block_k=max(INTERPRETER_CONFIG.block_k, group_k))


@triton.jit
def _piece_k_offsets(k0, piece: tl.constexpr, PIECES: tl.constexpr, GROUP_K: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """K positions that piece ``piece`` of each packing group in this K step unpacks to, in row order."""
    PIECE: tl.constexpr = GROUP_K // PIECES
    t = tl.arange(0, BLOCK_K // PIECES)
    ks = k0 + (t // PIECE) * GROUP_K + piece * PIECE + (t % PIECE)
    # Runs of PIECE consecutive positions starting at multiples of PIECE: lets the compiler vectorize the A
    # loads, which it cannot infer through the // and % above.
    return tl.max_contiguous(tl.multiple_of(ks, PIECE), PIECE)


@triton.jit
def _dot_piece(acc, a_ptr, rm, m_ok, ks, K, stride_am, stride_ak, w_piece, w_zero16,
               FLOAT_A: tl.constexpr):
    """acc += A[:, ks] @ (w_piece - w_zero); w_piece holds unsigned codes (BLOCK_K/PIECES, BLOCK_N)."""
    a = tl.load(a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=m_ok[:, None] & (ks[None, :] < K), other=0)
    w = w_piece.to(tl.int16) - w_zero16[None, :]
    # if/else, not an early return: the GPU compiler keeps compiling the statements after a constexpr
    # branch's return (the interpreter does not), and fp16 x int8 has no tl.dot.
    if FLOAT_A:
        acc = tl.dot(a, w.to(a.dtype), acc)
    else:
        acc = tl.dot(a, w.to(tl.int8), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _qgemm_kernel(
    a_ptr, w_ptr, w_scale_ptr, w_zero_ptr, w_col_sums_ptr, bias_ptr, residual_ptr, out_ptr, out_grid_ptr,
    M, N, K, ROW_BYTES, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_rm, stride_rn, stride_om, stride_on,
    a_scale, a_zero, out_scale, out_inv_scale, out_zero, out_qmin, out_qmax,
    STORAGE_BITS: tl.constexpr, GROUP_K: tl.constexpr, FLOAT_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EPILOGUE: tl.constexpr,
    ROUND_DTYPE: tl.constexpr, W_DENSE: tl.constexpr, HW_FMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order (Triton matmul tutorial): GROUP_M row-tiles share W tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    w_zero = tl.load(w_zero_ptr + rn, mask=n_ok, other=0)
    w_rows = w_ptr + rn[None, :] * stride_wn

    if FLOAT_A:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    a_rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)

    if STORAGE_BITS == 8:
        # Dense rows, no unpack: int8 codes (W8), or W - w_zero already (W_DENSE, the unpack-first path).
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + ks[:, None], mask=n_ok[None, :] & (ks[:, None] < K), other=0)
            if FLOAT_A and not W_DENSE:  # fp16/bf16 x int8 codes: W - w_zero converted in registers
                acc = _dot_piece(acc, a_ptr, rm, m_ok, ks, K, stride_am, stride_ak, w, w_zero.to(tl.int16),
                                 FLOAT_A)
            else:
                a = tl.load(a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak,
                            mask=m_ok[:, None] & (ks[None, :] < K), other=0)
                if FLOAT_A:
                    acc = tl.dot(a, w, acc)
                else:
                    acc = tl.dot(a, w, acc, out_dtype=tl.int32)
                    if not W_DENSE:  # W - w_zero may overflow int8: corrected with row sums of A after the loop
                        a_rowsum += tl.sum(a.to(tl.int32), axis=1)
    elif STORAGE_BITS == 4:
        w_zero16 = w_zero.to(tl.int16)
        for k0 in range(0, K, BLOCK_K):
            byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_rows + byte[:, None], mask=n_ok[None, :] & (byte[:, None] < ROW_BYTES), other=0)
            for piece in tl.static_range(2):
                codes = (packed >> (4 * piece)) & 0xF
                ks = _piece_k_offsets(k0, piece, 2, GROUP_K, BLOCK_K)
                acc = _dot_piece(acc, a_ptr, rm, m_ok, ks, K, stride_am, stride_ak, codes, w_zero16, FLOAT_A)
    else:
        w_zero16 = w_zero.to(tl.int16)
        GROUP_BYTES: tl.constexpr = 3 * GROUP_K // 8
        t = tl.arange(0, BLOCK_K // 4)
        r = t % (GROUP_K // 4)
        # The 1-bit byte of row r of a quarter is loaded for two rows (r % G/8); its bit is 2f + r // (G/8).
        hi_shift = (r // (GROUP_K // 8)).to(tl.uint8)[:, None]
        for k0 in range(0, K, BLOCK_K):
            group = k0 // GROUP_K + t // (GROUP_K // 4)
            ok = n_ok[None, :] & (group[:, None] * GROUP_BYTES < ROW_BYTES)
            offs2 = tl.max_contiguous(group * GROUP_BYTES + r, GROUP_K // 4)
            offs1 = tl.max_contiguous(group * GROUP_BYTES + GROUP_K // 4 + r % (GROUP_K // 8), GROUP_K // 8)
            plane2 = tl.load(w_rows + offs2[:, None], mask=ok, other=0)
            plane1 = tl.load(w_rows + offs1[:, None], mask=ok, other=0)
            for piece in tl.static_range(4):
                codes = ((plane2 >> (2 * piece)) & 3) | (((plane1 >> (hi_shift + 2 * piece)) & 1) << 2)
                ks = _piece_k_offsets(k0, piece, 4, GROUP_K, BLOCK_K)
                acc = _dot_piece(acc, a_ptr, rm, m_ok, ks, K, stride_am, stride_ak, codes, w_zero16, FLOAT_A)

    if not FLOAT_A:
        if STORAGE_BITS == 8 and not W_DENSE:
            acc = acc - a_rowsum[:, None] * w_zero[None, :]
        col_sums = tl.load(w_col_sums_ptr + rn, mask=n_ok, other=0)
        acc = acc - a_zero * col_sums[None, :]

    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    out_ok = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE == 2:
        tl.store(out_ptrs, acc, mask=out_ok)
    else:
        w_scale = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
        if FLOAT_A:
            row_scale = w_scale
        else:
            row_scale = a_scale * w_scale
        y = acc.to(tl.float32) * row_scale[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if APPLY_GELU:
            y = gelu_erf(y, HW_DIV=HW_FMA)
        if HAS_RESIDUAL:
            res = tl.load(residual_ptr + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=out_ok, other=0.0)
            y = y + res.to(tl.float32)
        if EPILOGUE == 1:
            q = uniform_quantize_int(y, out_scale, out_inv_scale, out_zero, out_qmin, out_qmax, HW_FMA)
            tl.store(out_ptrs, q.to(tl.int8), mask=out_ok)
        elif EPILOGUE == 3:
            # out_grid (5, N): scale, zero, qmin, qmax, RN(1 / scale) per column. Rounding to ROUND_DTYPE first
            # gives the codes of quantizing the GEMM's ROUND_DTYPE output (what the unfused path does).
            g_scale = tl.load(out_grid_ptr + rn, mask=n_ok, other=1.0)
            g_zero = tl.load(out_grid_ptr + N + rn, mask=n_ok, other=0.0)
            g_min = tl.load(out_grid_ptr + 2 * N + rn, mask=n_ok, other=0.0)
            g_max = tl.load(out_grid_ptr + 3 * N + rn, mask=n_ok, other=0.0)
            g_inv = tl.load(out_grid_ptr + 4 * N + rn, mask=n_ok, other=1.0)
            y = y.to(ROUND_DTYPE).to(tl.float32)
            q = uniform_quantize_int(y, g_scale[None, :], g_inv[None, :], g_zero[None, :], g_min[None, :],
                                     g_max[None, :], HW_FMA)
            tl.store(out_ptrs, q.to(tl.int8), mask=out_ok)
        else:
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------------
# Autotuning (CUDA only)
# ---------------------------------------------------------------------------------------------------

_TUNE_SPACE = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): large-M tiles amortise the unpack, small-M
    # tiles keep enough programs busy at batch 1 (M = 197).
    (256, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 256, 8, 3),
    (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 5), (64, 128, 256, 4, 3),
    (32, 64, 128, 4, 5), (32, 128, 128, 4, 4), (16, 64, 256, 4, 4), (16, 128, 128, 4, 4),
    (128, 256, 256, 8, 2),
]
_SMEM_BUDGET_BYTES = 200 * 1024  # H100: 228 KB per SM, leave room for the epilogue

# DFQVIT_AUTOTUNE=quick tries three tiles per key instead of the whole space (each tile is one Triton
# compilation, 1-3 s; a ViT has ~6 GEMM variants per M bucket): the benchmarks' default on a lent GPU.
_QUICK_TILES = {  # M bucket at least -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps)
    4096: [(128, 256, 128, 8), (256, 128, 128, 8), (128, 128, 128, 8)],
    512: [(128, 128, 128, 8), (64, 128, 128, 4), (128, 64, 128, 4)],
    0: [(64, 64, 128, 4), (32, 64, 128, 4), (16, 64, 256, 4)],
}
# The unpack-first (dense) GEMM at large M: an int32-accumulator wgmma waits after every tl.dot, so a K step of
# 256 (8 wgmma instructions per wait per warpgroup instead of 4) is among the three tried. Unmeasured guess;
# latency.py records which tile wins (autotune_choices).
_QUICK_TILES_DENSE = {**_QUICK_TILES, 4096: [(128, 256, 128, 8), (256, 128, 128, 8), (128, 256, 256, 8)]}


def autotune_mode() -> str:
    """``DFQVIT_AUTOTUNE``: "full" (default: every tile of the tune space) or "quick" (three per M bucket)."""
    mode = os.environ.get("DFQVIT_AUTOTUNE", "full").lower()
    if mode not in ("full", "quick"):
        raise KernelInputError(f"DFQVIT_AUTOTUNE={mode!r}; allowed: 'full' (default) or 'quick'.")
    return mode


def _quick_subset(kept, bucket, dense=False):
    """The tiles of ``_QUICK_TILES`` (``_QUICK_TILES_DENSE`` for the unpack-first int8 GEMM) for this M bucket that
    survived pruning (else the first three kept)."""
    table = _QUICK_TILES_DENSE if dense else _QUICK_TILES
    wanted = next(tiles for floor, tiles in sorted(table.items(), reverse=True) if bucket >= floor)
    chosen = [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
              in wanted]
    return chosen or kept[:3]


def _prune_configs(configs, named_args, **kwargs):
    """gemlite-style pruning: BLOCK_K a multiple of the packing group, BLOCK_M no bigger than the M
    bucket needs, pipelined tiles within shared memory; drop duplicates."""
    args = {**named_args, **kwargs}
    bits, group_k, bucket = args["STORAGE_BITS"], args["GROUP_K"], args["M_BUCKET"]
    a_bytes = 2 if args["FLOAT_A"] else 1
    if args["W_DENSE"]:
        bits = 8 * a_bytes  # unpacked to the activations' type
    kept, seen = [], set()
    for cfg in configs:
        kw = cfg.kwargs
        bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        if bk % group_k or bm > max(16, bucket):
            continue
        smem = cfg.num_stages * (bm * bk * a_bytes + bk * bn * bits // 8)
        stages = cfg.num_stages
        while smem > _SMEM_BUDGET_BYTES and stages > 2:
            stages -= 1
            smem = stages * (bm * bk * a_bytes + bk * bn * bits // 8)
        if smem > _SMEM_BUDGET_BYTES:
            continue
        key = (bm, bn, bk, cfg.num_warps, stages)
        if key not in seen:
            seen.add(key)
            kept.append(triton.Config(dict(kw), num_warps=cfg.num_warps, num_stages=stages))
    if kept and autotune_mode() == "quick":
        kept = _quick_subset(kept, bucket, dense=bool(args["W_DENSE"]) and not args["FLOAT_A"])
    return kept or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": max(group_k, 64), "GROUP_M": 8},
                                  num_warps=4, num_stages=2)]


_qgemm_kernel_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in _TUNE_SPACE],
    key=["M_BUCKET", "N", "K", "STORAGE_BITS", "FLOAT_A", "EPILOGUE", "HAS_RESIDUAL", "W_DENSE"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_qgemm_kernel)


# ---------------------------------------------------------------------------------------------------
# Validation and launch
# ---------------------------------------------------------------------------------------------------

_FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32)


def _check_weight(entry, w_packed, w_scale, w_zero, w_col_sums, storage_bits, k, group_k):
    if storage_bits not in (3, 4, 8):
        raise KernelInputError(f"{entry}: storage_bits={storage_bits}; allowed: 3 (int3 planes), 4 (int4), "
                               "8 (int8 rows, for 5..8-bit weights).")
    if storage_bits in (3, 4) and (group_k < 16 or group_k & (group_k - 1)):
        raise KernelInputError(f"{entry}: group_k={group_k}; allowed: a power of two >= 16, the value the "
                               "weight was packed with (PackedWeight.group_k).")
    if k < 1:
        raise KernelInputError(f"{entry}: k={k}; it must be >= 1.")
    check_tensor(entry, "w_packed", w_packed, dtypes=(torch.int8,) if storage_bits == 8 else (torch.uint8,),
                 ndim=2, contiguous=True)
    n = w_packed.shape[0]
    expected = reference.packed_row_bytes(k, storage_bits, group_k)
    if w_packed.shape[1] != expected:
        raise KernelInputError(
            f"{entry}: w_packed has {w_packed.shape[1]} bytes per row, but {storage_bits}-bit storage of "
            f"k={k} (group_k={group_k}) has {expected}; the weight was packed for a different K or layout."
        )
    check_tensor(entry, "w_scale", w_scale, dtypes=(torch.float32,), shape=(n,), contiguous=True)
    check_tensor(entry, "w_zero", w_zero, dtypes=(torch.int32,), shape=(n,), contiguous=True)
    if w_col_sums is not None:  # the weight-only path needs no column sums
        check_tensor(entry, "w_col_sums", w_col_sums, dtypes=(torch.int32,), shape=(n,), contiguous=True)
    return n


def _check_epilogue(entry, m, n, bias, residual, out_scale, out_zero, out_qmin, out_qmax, out_dtype):
    if bias is not None:
        check_tensor(entry, "bias", bias, dtypes=_FLOAT_OUT, shape=(n,), contiguous=True)
    if residual is not None:
        check_tensor(entry, "residual", residual, dtypes=_FLOAT_OUT, shape=(m, n))
    if out_scale is None:
        if out_dtype not in _FLOAT_OUT:
            raise KernelInputError(f"{entry}: out_dtype={out_dtype} without out_scale; allowed: float16, "
                                   "bfloat16, float32 (pass out_scale to re-quantize to int8).")
    else:
        if out_dtype != torch.int8:
            raise KernelInputError(f"{entry}: out_scale is set (re-quantize) so out_dtype must be torch.int8, "
                                   f"got {out_dtype}.")
        check_requant_grid(entry, out_scale, out_zero, out_qmin, out_qmax)


def max_a_zero(k: int) -> int:
    """The largest |a_zero| whose correction ``a_zero * w_col_sums`` and exact accumulator stay in int32 (columns of
    ``W - w_zero`` hold at most 255 per K position): an int8 bound refused engine grids of all-positive inputs."""
    return min(ZERO_POINT_BOUND, max(128, (2 ** 31 - 1) // (255 * max(int(k), 1)) - 128))


def check_qgemm_args(entry, a, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual, storage_bits, k,
                     group_k, out_scale, out_zero, out_qmin, out_qmax, out_dtype):
    """Metadata-only checks (work on fake tensors too) shared by the op, its fake and the launcher."""
    n = _check_weight(entry, w_packed, w_scale, w_zero, w_col_sums, storage_bits, k, group_k)
    check_tensor(entry, "a", a, dtypes=(torch.int8,), ndim=2, last_dim_contiguous=True)
    if a.shape[1] != k:
        raise KernelInputError(f"{entry}: a has K={a.shape[1]} columns but the packed weight has k={k}; "
                               "the activation and weight must share the inner dimension.")
    bound = max_a_zero(k)
    check_int_range(entry, "a_zero", a_zero, -bound, bound)
    _check_epilogue(entry, a.shape[0], n, bias, residual, out_scale, out_zero, out_qmin, out_qmax, out_dtype)
    check_same_device(entry, (("a", a), ("w_packed", w_packed), ("w_scale", w_scale), ("w_zero", w_zero),
                              ("w_col_sums", w_col_sums), ("bias", bias), ("residual", residual)))
    return a.shape[0], n


def check_qgemm_w16_args(entry, x, w_packed, w_scale, w_zero, bias, residual, storage_bits, k, group_k,
                         out_dtype):
    n = _check_weight(entry, w_packed, w_scale, w_zero, None, storage_bits, k, group_k)
    check_tensor(entry, "x", x, dtypes=(torch.float16, torch.bfloat16), ndim=2, last_dim_contiguous=True)
    if x.shape[1] != k:
        raise KernelInputError(f"{entry}: x has K={x.shape[1]} columns but the packed weight has k={k}.")
    _check_epilogue(entry, x.shape[0], n, bias, residual, None, 0, 0, 0, out_dtype)
    check_same_device(entry, (("x", x), ("w_packed", w_packed), ("w_scale", w_scale), ("w_zero", w_zero),
                              ("bias", bias), ("residual", residual)))
    return x.shape[0], n


def unpack_first_min_m() -> int:
    """Smallest M that takes the unpack-first path by default: ``DFQVIT_UNPACK_FIRST_MIN_M`` (default 1024)."""
    raw = os.environ.get("DFQVIT_UNPACK_FIRST_MIN_M", str(UNPACK_FIRST_MIN_M))
    try:
        return int(raw)
    except ValueError:
        raise KernelInputError(f"DFQVIT_UNPACK_FIRST_MIN_M={raw!r}; expected an integer (rows M from which "
                               "int4/int3 weights are unpacked before the GEMM).") from None


_forced_unpack_first: Optional[bool] = None


@contextmanager
def gemm_path(unpack_first: Optional[bool]):
    """Inside the block, int4/int3 GEMMs take the unpack-first path (True) or unpack inside the K loop (False)
    at every M; None keeps the rule by M. For side-by-side benchmarks (a CUDA graph keeps the kernels it
    captured); ``GemmConfig.unpack_first`` still wins. Not thread-safe."""
    global _forced_unpack_first
    previous, _forced_unpack_first = _forced_unpack_first, unpack_first
    try:
        yield
    finally:
        _forced_unpack_first = previous


def use_unpack_first(config: Optional[GemmConfig], m: int, storage_bits: int) -> bool:
    """Whether int4/int3 weights are unpacked to a dense ``W - w_zero`` before the GEMM (see module docstring):
    ``config.unpack_first`` if set, else :func:`gemm_path`'s choice, else ``m >= unpack_first_min_m()``."""
    if storage_bits == 8:
        return False
    if config is not None and config.unpack_first is not None:
        return config.unpack_first
    if _forced_unpack_first is not None:
        return _forced_unpack_first
    return m >= unpack_first_min_m()


def _launch(entry, a, a_scale, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual, storage_bits, k,
            group_k, gelu, out_scale, out_zero, out_qmin, out_qmax, out, epilogue, float_a,
            config: Optional[GemmConfig], out_grid: Optional[torch.Tensor] = None, round_dtype=torch.float32):
    m, n = out.shape
    device = require_triton_device(entry, _qgemm_kernel, [a, w_packed, w_scale, w_zero, w_col_sums, bias,
                                                          residual])
    if m == 0:
        return out
    w_dense = use_unpack_first(config, m, storage_bits)
    if w_dense:  # transient (N, K) W - w_zero in the MMA's input type; the packed weight stays the stored one
        w_packed = unpack_centered_triton(w_packed, w_zero, storage_bits, k, group_k,
                                          a.dtype if float_a else torch.int8)
        storage_bits, group_k = 8, 1
    if config is None and device.type == "cpu":
        config = interpreter_config(group_k if storage_bits != 8 else 1)
    if config is not None and storage_bits != 8 and config.block_k % group_k:
        raise KernelInputError(f"{entry}: config.block_k={config.block_k} must be a multiple of group_k={group_k}.")
    min_piece = 16 if float_a else 32  # tensor-core K: 16 for fp16/bf16 MMA, 32 for int8 MMA
    if device.type == "cuda" and storage_bits != 8 and group_k // (2 if storage_bits == 4 else 4) < min_piece:
        raise KernelInputError(f"{entry}: group_k={group_k} gives K-pieces of fewer than {min_piece} positions, too "
                               "small for a tensor-core tl.dot on CUDA; pack with the default group_k (64 for int4, "
                               "128 for int3).")
    dummy = w_scale  # placeholder pointer for absent optional tensors (never read: constexpr-guarded)
    args = (a, w_packed, w_scale, w_zero, w_col_sums, dummy if bias is None else bias,
            dummy if residual is None else residual, out, dummy if out_grid is None else out_grid,
            m, n, k, w_packed.shape[1], m_bucket(m),
            a.stride(0), a.stride(1), w_packed.stride(0),
            0 if residual is None else residual.stride(0), 0 if residual is None else residual.stride(1),
            out.stride(0), out.stride(1),
            float(a_scale), int(a_zero), float(out_scale or 1.0), reciprocal_fp32(out_scale or 1.0), float(out_zero),
            float(out_qmin), float(out_qmax))
    meta = dict(STORAGE_BITS=storage_bits, GROUP_K=group_k if storage_bits != 8 else 1, FLOAT_A=float_a,
                HAS_BIAS=bias is not None, APPLY_GELU=bool(gelu), HAS_RESIDUAL=residual is not None,
                EPILOGUE=epilogue, ROUND_DTYPE=torch_dtype_to_triton(round_dtype), W_DENSE=w_dense,
                HW_FMA=device.type == "cuda")
    if config is None:
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
        _qgemm_kernel_autotuned[grid](*args, **meta)
    else:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
        _qgemm_kernel[grid](*args, **meta, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                            BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps,
                            num_stages=config.num_stages)
    return out


def qgemm_triton(a: torch.Tensor, a_scale: float, a_zero: int, w_packed: torch.Tensor, w_scale: torch.Tensor,
                 w_zero: torch.Tensor, w_col_sums: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], storage_bits: int, k: int, group_k: int, gelu: bool,
                 out_scale: Optional[float], out_zero: int, out_qmin: int, out_qmax: int,
                 out_dtype: torch.dtype, config: Optional[GemmConfig] = None) -> torch.Tensor:
    """Run the Triton W{3,4,8}A8 GEMM (CUDA, or CPU under ``TRITON_INTERPRET=1``); op ``dfqvit::qgemm``."""
    entry = "qgemm_triton"
    m, n = check_qgemm_args(entry, a, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual, storage_bits,
                            k, group_k, out_scale, out_zero, out_qmin, out_qmax, out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    epilogue = EPILOGUE_FLOAT if out_scale is None else EPILOGUE_REQUANT
    return _launch(entry, a, a_scale, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual, storage_bits,
                   k, group_k, gelu, out_scale, out_zero, out_qmin, out_qmax, out, epilogue, False, config)


def qgemm_columns_triton(a: torch.Tensor, a_scale: float, a_zero: int, w_packed: torch.Tensor,
                         w_scale: torch.Tensor, w_zero: torch.Tensor, w_col_sums: torch.Tensor,
                         bias: Optional[torch.Tensor], storage_bits: int, k: int, group_k: int,
                         out_grid: torch.Tensor, round_dtype: torch.dtype = torch.float32,
                         config: Optional[GemmConfig] = None) -> torch.Tensor:
    """The W{3,4,8}A8 GEMM re-quantized to int8 with one grid per output column: ``out_grid`` (4, N) fp32 rows
    scale, zero, qmin, qmax (the qkv GEMM, whose q, k and v columns have grids of their own), or (5, N) with
    row 4 = ``1 / scale`` in fp32 (:func:`column_grid_with_inverse`; else it is computed per call). The float
    result is rounded to ``round_dtype`` first, so the codes equal quantizing the ``round_dtype`` output of
    :func:`qgemm_triton` with ``reference.uniform_quantize``."""
    entry = "qgemm_columns_triton"
    m, n = check_qgemm_args(entry, a, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, None, storage_bits, k,
                            group_k, None, 0, 0, 0, round_dtype)
    if isinstance(out_grid, torch.Tensor) and out_grid.dim() == 2 and out_grid.shape[0] == 5:
        check_tensor(entry, "out_grid", out_grid, dtypes=(torch.float32,), shape=(5, n), contiguous=True)
    else:
        check_tensor(entry, "out_grid", out_grid, dtypes=(torch.float32,), shape=(4, n), contiguous=True)
    check_same_device(entry, (("a", a), ("out_grid", out_grid)))
    check_requant_columns(entry, out_grid)  # values checked on CPU tensors only (no device sync per launch)
    if out_grid.shape[0] == 4:
        out_grid = column_grid_with_inverse(out_grid)
    out = torch.empty((m, n), dtype=torch.int8, device=a.device)
    return _launch(entry, a, a_scale, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, None, storage_bits, k,
                   group_k, False, None, 0, 0, 0, out, EPILOGUE_REQUANT_COLUMNS, False, config, out_grid,
                   round_dtype)


def column_grid_with_inverse(grid: torch.Tensor) -> torch.Tensor:
    """(4, N) per-column grid -> (5, N) with row 4 = ``1 / scale`` in fp32 (IEEE division, so RN(1 / scale)): what
    the epilogue's division by the scale needs (``_common.divide_rn``). Compute it once for a fixed grid."""
    return torch.cat([grid, torch.reciprocal(grid[:1])]).contiguous()


def qgemm_accumulator_triton(a: torch.Tensor, a_zero: int, w_packed: torch.Tensor, w_zero: torch.Tensor,
                             w_col_sums: torch.Tensor, storage_bits: int, k: int, group_k: int,
                             config: Optional[GemmConfig] = None) -> torch.Tensor:
    """The kernel's exact int32 accumulator ``sum_k (A - a_zero)(W - w_zero)`` (M, N), for exact tests;
    compare with ``reference.qgemm_accumulator_reference``."""
    entry = "qgemm_accumulator_triton"
    w_scale = torch.ones(w_packed.shape[0], dtype=torch.float32, device=w_packed.device)
    m, n = check_qgemm_args(entry, a, a_zero, w_packed, w_scale, w_zero, w_col_sums, None, None, storage_bits, k,
                            group_k, None, 0, 0, 0, torch.float32)
    out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    return _launch(entry, a, 1.0, a_zero, w_packed, w_scale, w_zero, w_col_sums, None, None, storage_bits, k,
                   group_k, False, None, 0, 0, 0, out, EPILOGUE_ACCUMULATOR, False, config)


def qgemm_w16_triton(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                     bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], storage_bits: int, k: int,
                     group_k: int, gelu: bool, out_dtype: torch.dtype,
                     config: Optional[GemmConfig] = None) -> torch.Tensor:
    """Run the Triton weight-only GEMM (fp16/bf16 x, int4/int3/int8 W); op ``dfqvit::qgemm_w16``.

    ``W - w_zero`` is exact in fp16/bf16 and the scale is applied in the epilogue, so the only rounding
    is the fp32 accumulation order.
    """
    entry = "qgemm_w16_triton"
    m, n = check_qgemm_w16_args(entry, x, w_packed, w_scale, w_zero, bias, residual, storage_bits, k, group_k,
                                out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    return _launch(entry, x, 1.0, 0, w_packed, w_scale, w_zero, w_zero, bias, residual, storage_bits, k, group_k,
                   gelu, None, 0, 0, 0, out, EPILOGUE_FLOAT, True, config)


# ---------------------------------------------------------------------------------------------------
# torch.library ops. custom_op, not triton_op: triton_op's decomposition traces the Triton launch even
# for CPU tensors (opcheck then fails without a GPU); the CPU implementation must be the reference.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("dfqvit::qgemm", mutates_args=())
def qgemm_op(a: torch.Tensor, a_scale: float, a_zero: int, w_packed: torch.Tensor, w_scale: torch.Tensor,
             w_zero: torch.Tensor, w_col_sums: torch.Tensor, bias: Optional[torch.Tensor],
             residual: Optional[torch.Tensor], storage_bits: int, k: int, group_k: int, gelu: bool,
             out_scale: Optional[float], out_zero: int, out_qmin: int, out_qmax: int,
             out_dtype: torch.dtype) -> torch.Tensor:
    """W{3,4,8}A8 GEMM with fused epilogue; CPU implementation = ``reference.qgemm_reference``."""
    check_qgemm_args("dfqvit::qgemm", a, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual,
                     storage_bits, k, group_k, out_scale, out_zero, out_qmin, out_qmax, out_dtype)
    return reference.qgemm_reference(a, a_scale, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual,
                                     storage_bits, k, group_k, gelu, out_scale, out_zero, out_qmin, out_qmax,
                                     out_dtype)


@qgemm_op.register_kernel("cuda")
def _qgemm_cuda(a, a_scale, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual, storage_bits, k,
                group_k, gelu, out_scale, out_zero, out_qmin, out_qmax, out_dtype):
    return qgemm_triton(a, a_scale, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual, storage_bits,
                        k, group_k, gelu, out_scale, out_zero, out_qmin, out_qmax, out_dtype)


@qgemm_op.register_fake
def _qgemm_fake(a, a_scale, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual, storage_bits, k,
                group_k, gelu, out_scale, out_zero, out_qmin, out_qmax, out_dtype):
    m, n = check_qgemm_args("dfqvit::qgemm", a, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual,
                            storage_bits, k, group_k, out_scale, out_zero, out_qmin, out_qmax, out_dtype)
    return a.new_empty((m, n), dtype=out_dtype)


@torch.library.custom_op("dfqvit::qgemm_w16", mutates_args=())
def qgemm_w16_op(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                 bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], storage_bits: int, k: int,
                 group_k: int, gelu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Weight-only GEMM (W4A16, W3A16, W8A16); CPU implementation = ``reference.qgemm_w16_reference``."""
    check_qgemm_w16_args("dfqvit::qgemm_w16", x, w_packed, w_scale, w_zero, bias, residual, storage_bits, k,
                         group_k, out_dtype)
    return reference.qgemm_w16_reference(x, w_packed, w_scale, w_zero, bias, residual, storage_bits, k, group_k,
                                         gelu, out_dtype)


@qgemm_w16_op.register_kernel("cuda")
def _qgemm_w16_cuda(x, w_packed, w_scale, w_zero, bias, residual, storage_bits, k, group_k, gelu, out_dtype):
    return qgemm_w16_triton(x, w_packed, w_scale, w_zero, bias, residual, storage_bits, k, group_k, gelu,
                            out_dtype)


@qgemm_w16_op.register_fake
def _qgemm_w16_fake(x, w_packed, w_scale, w_zero, bias, residual, storage_bits, k, group_k, gelu, out_dtype):
    m, n = check_qgemm_w16_args("dfqvit::qgemm_w16", x, w_packed, w_scale, w_zero, bias, residual, storage_bits,
                                k, group_k, out_dtype)
    return x.new_empty((m, n), dtype=out_dtype)


# ---------------------------------------------------------------------------------------------------
# Convenience front ends on a PackedWeight (what the engine calls)
# ---------------------------------------------------------------------------------------------------


def _residual_rows(entry: str, residual: Optional[torch.Tensor], lead: torch.Size, n: int):
    """``residual`` (..., N) as (M, N) rows, after checking it has the output's shape: a reshape alone would accept
    any tensor of the same size (a (6, 4) residual for a (4, 6) output, added in the wrong layout)."""
    if residual is None:
        return None
    check_tensor(entry, "residual", residual, shape=(*lead, n))
    return residual.reshape(-1, n)


def linear_a8(a: torch.Tensor, a_scale: float, a_zero: int, weight: PackedWeight,
              bias: Optional[torch.Tensor] = None, *, residual: Optional[torch.Tensor] = None, gelu: bool = False,
              out_scale: Optional[float] = None, out_zero: int = 0, out_qmin: int = -128, out_qmax: int = 127,
              out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``torch.ops.dfqvit.qgemm`` on activations of any leading shape (..., K) and a :class:`PackedWeight`.

    With ``out_scale`` the result is int8 (pass ``out_dtype=torch.int8``; it is set for you here).
    """
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    res2 = _residual_rows("linear_a8", residual, lead, weight.n)
    if out_scale is not None:
        out_dtype = torch.int8
    y = torch.ops.dfqvit.qgemm(a2, float(a_scale), int(a_zero), weight.data, weight.w_scale, weight.w_zero,
                               weight.w_col_sums, bias, res2, weight.storage_bits, weight.k, weight.group_k,
                               bool(gelu), None if out_scale is None else float(out_scale), int(out_zero),
                               int(out_qmin), int(out_qmax), out_dtype)
    return y.reshape(*lead, weight.n)


def linear_w16(x: torch.Tensor, weight: PackedWeight, bias: Optional[torch.Tensor] = None, *,
               residual: Optional[torch.Tensor] = None, gelu: bool = False,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.ops.dfqvit.qgemm_w16`` on fp16/bf16 activations of any leading shape (..., K)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    res2 = _residual_rows("linear_w16", residual, lead, weight.n)
    y = torch.ops.dfqvit.qgemm_w16(x2, weight.data, weight.w_scale, weight.w_zero, bias, res2,
                                   weight.storage_bits, weight.k, weight.group_k, bool(gelu),
                                   out_dtype or x.dtype)
    return y.reshape(*lead, weight.n)


__all__ = ["GemmConfig", "INTERPRETER_CONFIG", "interpreter_config", "column_grid_with_inverse", "gemm_path",
           "use_unpack_first", "linear_a8", "linear_w16", "qgemm_triton", "qgemm_columns_triton", "qgemm_w16_triton",
           "qgemm_accumulator_triton"]
