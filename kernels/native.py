"""The native CPU backend (``dfqvit._C``, built from ``kernels/csrc`` by CMake + Ninja), from Python.

When the extension is importable, importing ``dfqvit.kernels`` registers its kernels as the CPU
implementations of ``dfqvit::qgemm``, ``dfqvit::attention_log2`` and ``dfqvit::attention_linear`` (the ops the
Triton kernels implement on CUDA); without it those ops run ``reference.py`` on the CPU. Both give the same
bits (tests/test_kernels_native.py). ``DFQVIT_NATIVE=0`` leaves the extension unloaded.

The engine's ``native`` backend goes one step further: it converts each packed weight once into CPU panels
(:func:`prepack`, same bytes as the GPU layout) and calls :func:`qgemm_prepacked` on them. The engine's per-call
functions here (qgemm_prepacked*, attention, layernorm_quant, quantize) call the module's direct entry points
(``kernels/csrc/bindings.cpp``: the same registered ops through typed dispatcher handles, without torch.ops'
argument boxing, ~11 us a call less on the 2-core VM).

Each public function checks its numbers (grids, eps, attention scalars) before the call; the C++ kernels check
the tensors only. The engine calls their ``_*_unchecked`` twins: its grids are fixed when it is built, and
``NativeKernels.prepare`` checks them once there (repeated on every call they cost 1.3-1.7% of a batch-1 CIFAR
W4A8 forward's CPU time, ~2% on a two-block tiny ViT). What can change between its calls is still checked on
every call: tensors (by the kernel), dtypes, LayerNorm eps (``norm.eps``, a module attribute outside the engine's
grids: one comparison) and the qkv column grids (a buffer ``load_state_dict`` writes: ``check_requant_columns``,
again after each write).
"""
from __future__ import annotations

import importlib
import math
import os
from typing import Optional

import torch

from ._common import (ATTENTION_OUT_DTYPES, P_MODE_LINEAR, P_MODE_LOG2, check_attention_out_dtype,
                      check_attention_scalars, check_layernorm_eps, check_requant_columns, check_requant_grid)
from .errors import KernelInputError, MissingBackendError

_LOADED: Optional[bool] = None
_ISA_CHECKED = False  # whether DFQVIT_NATIVE_ISA was read without error
_EXT = None  # the dfqvit._C module once loaded: its functions skip torch.ops' argument boxing (bindings.cpp)


def _disabled_by_env() -> bool:
    return os.environ.get("DFQVIT_NATIVE", "1").strip().lower() in ("0", "off", "false", "no")


def available() -> bool:
    """Whether ``dfqvit._C`` is built and loaded (and not disabled by ``DFQVIT_NATIVE=0``)."""
    global _LOADED, _EXT
    if _LOADED is None:
        if _disabled_by_env():
            _LOADED = False
        else:
            try:
                _EXT = importlib.import_module("dfqvit._C")
                _LOADED = True
            except ImportError:
                _LOADED = False
    return _LOADED


def require() -> None:
    global _ISA_CHECKED
    if not available():
        if _disabled_by_env():  # building again would not help
            raise MissingBackendError(
                f"the native CPU backend is switched off (DFQVIT_NATIVE={os.environ.get('DFQVIT_NATIVE')} is set): "
                "unset DFQVIT_NATIVE (in a new process: it is read once) or use backend='torch' (the PyTorch "
                "reference, same results, slower)")
        raise MissingBackendError(
            "the native CPU backend is unavailable (dfqvit._C is not built). Build it with "
            "`DFQVIT_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .` (needs cmake, ninja, a C++ "
            "compiler), or use backend='torch' (the PyTorch reference, same results, slower).")
    if not _ISA_CHECKED:  # the extension reads DFQVIT_NATIVE_ISA at its first call and raises a RuntimeError
        try:
            torch.ops.dfqvit.native_isa()
        except RuntimeError as exc:
            message = str(exc).splitlines()[0].removeprefix("dfqvit native: ")
            raise KernelInputError(f"DFQVIT_NATIVE_ISA={os.environ.get('DFQVIT_NATIVE_ISA')!r}: {message.rstrip('.')}; "
                                   "or use backend='torch'") from None
        _ISA_CHECKED = True


def _ext():
    """dfqvit._C, loaded (MissingBackendError when it can't be)."""
    if _EXT is None:
        require()
    return _EXT


def isa() -> str:
    """The instruction set the native kernels use now: ``amx_int8``, ``avx512_vnni``, ``avx2`` or ``scalar``."""
    require()
    return torch.ops.dfqvit.native_isa()


def detected_isa() -> str:
    require()
    return torch.ops.dfqvit.native_detected_isa()


def set_isa(name: str) -> str:
    """Force ``scalar``/``avx2``/``avx512_vnni``/``amx_int8`` (or ``auto``); returns the previous one. For tests and
    benchmarks; ``DFQVIT_NATIVE_ISA`` sets the start value."""
    require()
    return torch.ops.dfqvit.native_set_isa(name)


def prepack(data: torch.Tensor, storage_bits: int, k: int, group_k: int) -> torch.Tensor:
    """GPU-layout packed weight (N, row_bytes) -> CPU panels uint8 (ceil(N/16), ceil(K/lane), 32)."""
    require()
    if data.device.type != "cpu":
        raise KernelInputError(f"prepack: the packed weight is on {data.device}; the native backend runs on the CPU.")
    return torch.ops.dfqvit.native_prepack_weight(data, int(storage_bits), int(k), int(group_k))


def qgemm_prepacked(a: torch.Tensor, a_scale: float, a_zero: int, panels: torch.Tensor, n: int,
                    w_scale: torch.Tensor, w_zero: torch.Tensor, w_col_sums: torch.Tensor, bias, residual,
                    storage_bits: int, k: int, gelu: bool, out_scale: Optional[float], out_zero: int, out_qmin: int,
                    out_qmax: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``dfqvit::qgemm`` on prepacked panels (same math and bits; ``w_col_sums`` must be the true sums)."""
    if out_scale is not None:  # the C++ kernel checks tensors, not the grid (codes past int8 would wrap)
        check_requant_grid("native.qgemm_prepacked", out_scale, out_zero, out_qmin, out_qmax)
    return _qgemm_prepacked_unchecked(a, a_scale, a_zero, panels, n, w_scale, w_zero, w_col_sums, bias, residual,
                                      storage_bits, k, gelu, out_scale, out_zero, out_qmin, out_qmax, out_dtype)


def qgemm_prepacked_norm(a: torch.Tensor, a_scale: float, a_zero: int, panels: torch.Tensor, n: int,
                         w_scale: torch.Tensor, w_zero: torch.Tensor, w_col_sums: torch.Tensor, bias, residual,
                         storage_bits: int, k: int, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                         scale: float, zero: int, qmin: int, qmax: int) -> tuple:
    """(y, codes): the fp32 ``qgemm_prepacked`` output (bias, residual) and ``layernorm_quant(y, ...)``, bit for
    bit the two calls, with each output tile normalized while it is still in cache (a pre-norm block's residual
    branch and the next GEMM's input)."""
    check_layernorm_eps("native.qgemm_prepacked_norm", eps)
    check_requant_grid("native.qgemm_prepacked_norm", scale, zero, qmin, qmax)
    return _qgemm_prepacked_norm_unchecked(a, a_scale, a_zero, panels, n, w_scale, w_zero, w_col_sums, bias,
                                           residual, storage_bits, k, norm_weight, norm_bias, eps, scale, zero, qmin,
                                           qmax)


def qgemm_prepacked_columns(a: torch.Tensor, a_scale: float, a_zero: int, panels: torch.Tensor, n: int,
                            w_scale, w_zero, w_col_sums, bias, storage_bits: int, k: int,
                            out_grid: torch.Tensor) -> torch.Tensor:
    """The GEMM re-quantized to int8 with a grid per output column: ``out_grid`` (4, N) = scale, zero, qmin,
    qmax (bit for bit ``uniform_quantize(fp32 GEMM output, *out_grid)``). The engine calls this one too: its grid
    is a buffer, checked once per version (no unchecked twin)."""
    if not (isinstance(out_grid, torch.Tensor) and out_grid.dtype == torch.float32 and out_grid.dim() == 2
            and out_grid.shape[0] == 4):  # the C++ kernel took float64 / float16 grids unchecked
        raise KernelInputError(f"native.qgemm_prepacked_columns: out_grid must be a float32 (4, N) tensor (scale, "
                               f"zero, qmin, qmax per column), got {_describe(out_grid)}")
    check_requant_columns("native.qgemm_prepacked_columns", out_grid)
    return _ext().qgemm_prepacked(a, float(a_scale), int(a_zero), panels, int(n), w_scale, w_zero, w_col_sums, bias,
                                  None, int(storage_bits), int(k), False, None, 0, 0, 0, torch.int8, out_grid)


def layernorm_quant(x: torch.Tensor, weight, bias, eps: float, scale: float, zero: int, qmin: int,
                    qmax: int) -> torch.Tensor:
    """``reference.layernorm_quant_reference`` in one pass per row."""
    check_layernorm_eps("native.layernorm_quant", eps)
    check_requant_grid("native.layernorm_quant", scale, zero, qmin, qmax)
    return _layernorm_quant_unchecked(x, weight, bias, eps, scale, zero, qmin, qmax)


def quantize(x: torch.Tensor, scale: float, zero: int, qmin: int, qmax: int) -> torch.Tensor:
    """``reference.uniform_quantize(x, scale, zero, qmin, qmax).to(int8)`` in one pass."""
    check_requant_grid("native.quantize", scale, zero, qmin, qmax)
    return _quantize_unchecked(x, scale, zero, qmin, qmax)


def attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, mask, p_mode: int,
              p_param: float, p_zero: int, p_bits: int, out_dtype: torch.dtype,
              out_grid: Optional[tuple] = None, token_major: bool = False) -> torch.Tensor:
    """The native attention (reference.attention_log2_reference / attention_linear_reference, bit for bit).

    ``token_major`` returns (B, N, H, d) instead of (B, H, N, d); ``out_grid`` = (scale, zero, qmin, qmax)
    returns int8 codes of the ``out_dtype`` result on that grid (``reference.uniform_quantize``): the
    projection GEMM's input, without a transpose copy or a separate quantize pass."""
    scale, zero, qmin, qmax = (None, 0, 0, 0) if out_grid is None else out_grid
    # The number checks of the ops and the Triton launcher (the C++ kernel checks the tensors).
    check_attention_scalars("native.attention", q_zero, k_zero, v_zero, p_mode, p_param, p_bits, out_dtype)
    if out_grid is not None:
        check_requant_grid("native.attention", scale, zero, qmin, qmax)
    return _attention_unchecked(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, mask,
                                p_mode, p_param, p_zero, p_bits, out_dtype, out_grid, token_major)


def _describe(value) -> str:
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


# The engine's entry points (see the module docstring): the functions above without the checks of numbers the
# engine fixed and checked when it was built. Only for it: here a wrong grid reaches the kernels, which trust it
# (codes past int8 would wrap in the store).

def _qgemm_prepacked_unchecked(a, a_scale, a_zero, panels, n, w_scale, w_zero, w_col_sums, bias, residual,
                               storage_bits, k, gelu, out_scale, out_zero, out_qmin, out_qmax, out_dtype):
    return _ext().qgemm_prepacked(a, float(a_scale), int(a_zero), panels, int(n), w_scale, w_zero, w_col_sums, bias,
                                  residual, int(storage_bits), int(k), bool(gelu),
                                  None if out_scale is None else float(out_scale), int(out_zero), int(out_qmin),
                                  int(out_qmax), out_dtype, None)


def _qgemm_prepacked_norm_unchecked(a, a_scale, a_zero, panels, n, w_scale, w_zero, w_col_sums, bias, residual,
                                    storage_bits, k, norm_weight, norm_bias, eps, scale, zero, qmin, qmax) -> tuple:
    if not 0.0 < eps < math.inf:  # the message, and NaN
        check_layernorm_eps("native.qgemm_prepacked_norm", eps)
    return _ext().qgemm_prepacked_norm(a, float(a_scale), int(a_zero), panels, int(n), w_scale, w_zero, w_col_sums,
                                       bias, residual, int(storage_bits), int(k), norm_weight, norm_bias, float(eps),
                                       float(scale), int(zero), int(qmin), int(qmax))


def _layernorm_quant_unchecked(x, weight, bias, eps, scale, zero, qmin, qmax) -> torch.Tensor:
    if not 0.0 < eps < math.inf:
        check_layernorm_eps("native.layernorm_quant", eps)
    return _ext().layernorm_quant(x, weight, bias, float(eps), float(scale), int(zero), int(qmin), int(qmax))


def _quantize_unchecked(x, scale, zero, qmin, qmax) -> torch.Tensor:
    return _ext().quantize(x, float(scale), int(zero), int(qmin), int(qmax))


def _attention_unchecked(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, mask, p_mode,
                         p_param, p_zero, p_bits, out_dtype, out_grid=None, token_major=False) -> torch.Tensor:
    if out_dtype not in ATTENTION_OUT_DTYPES:  # a dtype, not a number fixed at build
        check_attention_out_dtype("native.attention", out_dtype)
    scale, zero, qmin, qmax = (None, 0, 0, 0) if out_grid is None else out_grid
    return _ext().attention(q, k, v, float(q_scale), int(q_zero), float(k_scale), int(k_zero), float(v_scale),
                            int(v_zero), float(sm_scale), bias, mask, int(p_mode), float(p_param), int(p_zero),
                            int(p_bits), out_dtype, None if scale is None else float(scale), int(zero), int(qmin),
                            int(qmax), bool(token_major))


def register_cpu_kernels() -> bool:
    """Make the native kernels the CPU implementations of the dfqvit ops (idempotent); False without _C."""
    if not available():
        return False
    from . import attention as attention_module
    from . import qgemm as qgemm_module

    if getattr(register_cpu_kernels, "done", False):
        return True

    @qgemm_module.qgemm_op.register_kernel("cpu")
    def _qgemm_cpu(a, a_scale, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias, residual, storage_bits, k,
                   group_k, gelu, out_scale, out_zero, out_qmin, out_qmax, out_dtype):
        qgemm_module.check_qgemm_args("dfqvit::qgemm", a, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias,
                                      residual, storage_bits, k, group_k, out_scale, out_zero, out_qmin, out_qmax,
                                      out_dtype)
        return torch.ops.dfqvit.native_qgemm(a, a_scale, a_zero, w_packed, w_scale, w_zero, w_col_sums, bias,
                                             residual, storage_bits, k, group_k, gelu, out_scale, out_zero, out_qmin,
                                             out_qmax, out_dtype)

    @attention_module.attention_log2_op.register_kernel("cpu")
    def _attention_log2_cpu(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, mask,
                            p_delta, p_bits, out_dtype):
        attention_module.check_attention_args("dfqvit::attention_log2", q, k, v, q_zero, k_zero, v_zero, sm_scale,
                                              bias, mask, p_bits, out_dtype, P_MODE_LOG2, p_delta)
        return attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, mask,
                         P_MODE_LOG2, p_delta, 0, p_bits, out_dtype)

    @attention_module.attention_linear_op.register_kernel("cpu")
    def _attention_linear_cpu(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, mask,
                              p_scale, p_zero, p_bits, out_dtype):
        attention_module.check_attention_args("dfqvit::attention_linear", q, k, v, q_zero, k_zero, v_zero, sm_scale,
                                              bias, mask, p_bits, out_dtype, P_MODE_LINEAR, p_scale, p_zero)
        return attention(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, mask,
                         P_MODE_LINEAR, p_scale, p_zero, p_bits, out_dtype)

    register_cpu_kernels.done = True
    return True
