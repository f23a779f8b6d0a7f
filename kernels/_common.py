"""Pieces shared by the kernel families: Triton math helpers, device checks, M buckets.

Nothing here touches CUDA at import time. The Triton helpers avoid ``libdevice`` on purpose: the
interpreter (``TRITON_INTERPRET=1``, how the tests run without a GPU) does not implement it, and the
helpers below are exact in both worlds. (One exception, behind a flag that is only set on CUDA: GELU's
fast division.)
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .errors import KernelInputError, MissingGPUError

LOG2E = 1.4426950408889634  # log2(e): softmax in base 2 uses exp2(x * LOG2E) == exp(x)
SQRT1_2 = 0.7071067811865476  # 1/sqrt(2), the constant of the exact (erf) GELU

# Autotune buckets for M (gemlite's M_CLOSEST idea): configs are tuned once per bucket instead of once
# per distinct M. ViT uses M = batch * 197, so batch 1, 8, 64, 256 land in 256, 2048, 16384, 65536.
M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (capped at the largest): the autotune key for the M dimension."""
    for bucket in M_BUCKETS:
        if m <= bucket:
            return bucket
    return M_BUCKETS[-1]


# ---------------------------------------------------------------------------------------------------
# Triton math helpers
# ---------------------------------------------------------------------------------------------------


# 1.5 * 2**23: an fp32 in [2**23, 2**24) has no fraction bits, so adding this rounds to an integer (to nearest
# even, the IEEE default), and for |x| < 2**22 the sum stays in that binade with x's integer in its low bits.
ROUND_MAGIC = tl.constexpr(12582912.0)
ROUND_MAGIC_BITS = tl.constexpr(0x4B400000)  # its fp32 bit pattern


@triton.jit
def rint(x):
    """Round half to even (== ``torch.round``) for |x| < 2**22, with two fp32 adds and no libdevice.

    Callers use it on bounded values (exp2's exponent) or clamp the result to a small integer grid: a larger
    |x| comes back at least 2**22 - 1 in magnitude with its sign, so the clamp gives the same code; inf and nan
    pass through. (An earlier version built it from two ``floor`` calls and a tie test, ~13 instructions
    where this is 2, and ``floor`` runs on the GPU's slower conversion unit.) ``libdevice.round`` would round
    ties away from zero, and the interpreter has no libdevice.
    """
    return (x + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def uniform_quantize(x, scale, zero_point, qmin, qmax):
    """``clamp(rint(x / scale) + zero_point, qmin, qmax)`` with IEEE division, as in reference.py."""
    q = rint(tl.math.div_rn(x, scale)) + zero_point
    return tl.minimum(tl.maximum(q, qmin), qmax)


@triton.jit
def divide_rn(x, scale, inv_scale, HW_FMA: tl.constexpr):
    """``RN(x / scale)`` given ``inv_scale = RN(1 / scale)``: with fused multiply-adds (a GPU), Markstein's
    correction ``q = x * inv; r = fma(-q, scale, x); RN(q + r * inv)`` — one multiply and two FMAs where the
    IEEE division (``div_rn``) is a reciprocal, four FMAs, a range check and a branch per element. The
    interpreter's ``tl.fma`` rounds twice, so there (HW_FMA false) it is the division itself."""
    if HW_FMA:
        q = x * inv_scale
        r = tl.fma(-q, scale, x)
        return tl.fma(r, inv_scale, q)
    else:
        return tl.math.div_rn(x, scale)


# uniform_quantize_int's per-zero-point constants: z + 3 * 2**24 lies in [2**25, 2**26) for |z| <= 2**24, where fp32
# values are the multiples of 4, so it holds 3 * 2**24 + (z rounded to a multiple of 4); less 3 * 2**24 - ROUND_MAGIC
# that is ROUND_MAGIC + z4 (a multiple of 4 below 2**25: exact).
ZERO_SPLIT_MAGIC = tl.constexpr(50331648.0)  # 3 * 2**24
ZERO_SPLIT_OFFSET = tl.constexpr(37748736.0)  # 3 * 2**24 - 1.5 * 2**23


@triton.jit
def uniform_quantize_int(x, scale, inv_scale, zero_point, qmin, qmax, HW_FMA: tl.constexpr):
    """:func:`uniform_quantize` as int32 codes, through :func:`divide_rn` and the magic constant (the clamped
    value is an integer in [qmin, qmax]: its bits after the magic add hold it, no float-to-int conversion).

    The zero point goes into the rounding: ``(d + K) - L`` for ``d = x / scale``, with ``K = MAGIC + z4`` (``z4``:
    the zero point ``z`` rounded to a multiple of 4) and ``L = K - z = MAGIC - (z - z4)``, both exact. Where the
    code is unclamped (``rint(d) + z`` in [-128, 127]), ``d + K`` lies within 131 of MAGIC, in [2**23, 2**24)
    where fp32 values are the integers: its one rounding is ``rint(d)`` shifted by the even ``K`` (a tie rounds the
    same way), and ``- L`` leaves ``rint(d) + z`` exactly. Elsewhere both roundings are monotone, so the result is
    at least 127 (at most -128) where the reference's is: the same clamped code. Zero points are allowed up to
    ``ZERO_POINT_BOUND`` = 2**24 in magnitude, where ``rint(d) + z`` (``rint`` rounds for |d| < 2**22 only) gave
    5000000 + (-5000000) for ``d`` = 5000001: code 0 instead of 1. Per element two adds where ``rint(d) + z`` has
    three; per zero point three (per program for a scalar, per column a thread holds for a per-column grid). sm_90
    SASS per thread against ``rint(d) + z``: the 128 x 128 per-column GEMM tile +32 of ~2,200 instructions, the
    per-tensor epilogues (GEMM, attention, LayerNorm) 8 to 64 fewer."""
    z = tl.cast(zero_point, tl.float32)  # the interpreter passes a scalar argument as a Python float
    k = (z + ZERO_SPLIT_MAGIC) - ZERO_SPLIT_OFFSET
    q = (divide_rn(x, scale, inv_scale, HW_FMA) + k) - (k - z)
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    return (q + ROUND_MAGIC).to(tl.int32, bitcast=True) - ROUND_MAGIC_BITS


@triton.jit
def _horner_erf_num(x2):
    p = x2 * -2.72614225801306e-10 + 2.77068142495902e-08
    p = p * x2 + -2.10102402082508e-06
    p = p * x2 + -5.69250639462346e-05
    p = p * x2 + -7.34990630326855e-04
    p = p * x2 + -2.95459980854025e-03
    return p * x2 + -1.60960333262415e-02


@triton.jit
def _horner_erf_den(x2):
    q = x2 * -1.45660718464996e-05 + -2.13374055278905e-04
    q = q * x2 + -1.68282697438203e-03
    q = q * x2 + -7.37332916720468e-03
    return q * x2 + -1.42647390514189e-02


@triton.jit
def gelu_erf(x, HW_DIV: tl.constexpr = False):
    """GELU ``x * 0.5 * (1 + erf(x / sqrt(2)))`` with ``portable_math.erf`` (same constants and order;
    bit-identical under the interpreter, an FMA contraction away on a GPU).

    ``HW_DIV`` (set on CUDA) divides P by Q with ``div.approx.f32`` (libdevice ``fast_dividef``: MUFU.RCP and a
    multiply, within 2 ulp for |Q| in [2**-126, 2**126]; here |Q| lies in [0.014, 0.6]) instead of the IEEE
    ``div_rn`` (reciprocal, four FMAs, a range check and a branch per element): erf moves by at most ~3e-7,
    below the rational approximation's own 4.5e-7. SASS instructions per thread of fc1's whole GELU + re-quantize
    kernel (W4A8, 128 x 128 tile): 4,032 with div_rn, 3,424 with ``div.full.f32`` (which rescales out-of-range
    operands: two FSETP and five FMUL per element), 3,120 with this."""
    z = tl.minimum(tl.maximum(x * 0.7071067811865476, -4.0), 4.0)
    z2 = z * z
    if HW_DIV:
        erf = libdevice.fast_dividef(z * _horner_erf_num(z2), _horner_erf_den(z2))
    else:
        erf = tl.math.div_rn(z * _horner_erf_num(z2), _horner_erf_den(z2))
    return x * 0.5 * (1.0 + erf)


@triton.jit
def exp2_nonpositive(d):
    """``portable_math.exp2``: 2**d for -2**22 < d <= 0 from round(d), a degree-7 polynomial and exponent bits.

    round(d) comes from the magic add of :func:`rint`; its integer is read from the low bits of the sum, so
    no float-to-int conversion is needed."""
    y = d + ROUND_MAGIC
    n = y - ROUND_MAGIC
    f = d - n
    p = f * 1.5252733646775596e-05 + 1.540352968731895e-04
    p = p * f + 1.3333557872101665e-03
    p = p * f + 9.618128649890423e-03
    p = p * f + 5.550410971045494e-02
    p = p * f + 2.4022650718688965e-01
    p = p * f + 6.931471824645996e-01
    p = p * f + 1.0
    n_int = y.to(tl.int32, bitcast=True) - ROUND_MAGIC_BITS
    two_n = ((tl.maximum(n_int, -126) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(d < -126.0, 0.0, p * two_n)


@triton.jit
def round_neg_log2(ratio):
    """``portable_math.round_neg_log2`` from the fp32 bits (normal and subnormal ratios; 0 -> 2**30)."""
    tiny = ratio < 1.1754943508222875e-38
    r = tl.where(tiny, ratio * 18446744073709551616.0, ratio)  # * 2**64: subnormals become normal, exactly
    bits = r.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 - tl.where(tiny, 64, 0)
    k = -e - tl.where((bits & 0x7FFFFF) >= 0x3504F4, 1, 0)  # mantissa above sqrt(2): round up
    return tl.where(ratio > 0.0, k, 1 << 30)


@triton.jit
def small_int_to_float(i):
    """int32 -> fp32 for |i| < 2**22 through the magic constant (exact; no conversion instruction)."""
    return (i + ROUND_MAGIC_BITS).to(tl.float32, bitcast=True) - ROUND_MAGIC


# ---------------------------------------------------------------------------------------------------
# Launch checks
# ---------------------------------------------------------------------------------------------------


def interpreter_requested() -> bool:
    """True when the environment asks Triton to interpret kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a jit function, possibly under autotune/heuristics) was built for the
    interpreter; Triton decides this once, when the module defining it is imported."""
    while hasattr(kernel, "fn") and not type(kernel).__name__.endswith("Function"):
        kernel = kernel.fn
    return type(kernel).__name__ == "InterpretedFunction"


def require_triton_device(entry: str, kernel, tensors: Sequence[torch.Tensor | None]) -> torch.device:
    """Check that the Triton kernel behind ``entry`` can run on these tensors; return their device.

    CUDA tensors always can. CPU tensors can only under ``TRITON_INTERPRET=1`` set *before* dfqvit
    was imported (Triton fixes compiled-vs-interpreted when a kernel is defined).
    """
    present = [t for t in tensors if t is not None]
    devices = {t.device.type for t in present}
    if len(devices) > 1:
        raise KernelInputError(
            f"{entry}: tensors are on different devices {sorted(devices)}; move all inputs to one device "
            "(cuda for the Triton kernel)."
        )
    device = present[0].device
    if device.type == "cuda":
        return device
    if device.type == "cpu":
        if kernel_is_interpreted(kernel):
            return device
        if interpreter_requested():
            raise KernelInputError(
                f"{entry}: TRITON_INTERPRET=1 is set but the Triton kernels were defined before it was; "
                "set TRITON_INTERPRET=1 before importing dfqvit (e.g. at the top of conftest.py)."
            )
        raise MissingGPUError(
            f"{entry} runs a Triton kernel and got CPU tensors without TRITON_INTERPRET=1. Move the inputs "
            "to a CUDA device, call the torch.ops.dfqvit op (its CPU implementation is the PyTorch "
            "reference), or set TRITON_INTERPRET=1 before importing dfqvit to interpret the kernel on CPU."
        )
    raise KernelInputError(f"{entry}: tensors on device type {device.type!r}; allowed: cuda, or cpu under "
                           "TRITON_INTERPRET=1.")


def check_tensor(entry: str, name: str, t: torch.Tensor, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | None = None, shape: Sequence[int] | None = None,
                 contiguous: bool = False, last_dim_contiguous: bool = False) -> None:
    """Raise a :class:`KernelInputError` naming what was given and what is allowed."""
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{entry}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise KernelInputError(f"{entry}: {name} has dtype {str(t.dtype).replace('torch.', '')}; allowed: "
                               f"{allowed}. Convert it with .to(...) before the call.")
    if ndim is not None and t.dim() != ndim:
        raise KernelInputError(f"{entry}: {name} must be {ndim}-D, got shape {tuple(t.shape)}.")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise KernelInputError(f"{entry}: {name} has shape {tuple(t.shape)}; expected {tuple(shape)}.")
    if contiguous and not t.is_contiguous():
        raise KernelInputError(f"{entry}: {name} (shape {tuple(t.shape)}, strides {t.stride()}) is not "
                               "contiguous; call .contiguous() first.")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise KernelInputError(f"{entry}: {name} has stride {t.stride(-1)} in its last dimension; it must be "
                               "1 (call .contiguous()).")


def check_same_device(entry: str, tensors: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """All (name, tensor) arguments on one device (None skipped). The kernels read every pointer on the device they
    run on: a meta tensor (or one on another device) mixed in gives uninitialized memory, not an error."""
    present = [(name, t) for name, t in tensors if isinstance(t, torch.Tensor)]
    if len({t.device for _, t in present}) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present)
        raise KernelInputError(f"{entry}: tensors are on different devices ({where}); move them all to one device.")


def check_int_range(entry: str, name: str, value: int, lo: int, hi: int) -> None:
    if not (lo <= int(value) <= hi):
        raise KernelInputError(f"{entry}: {name}={value} is outside the allowed range [{lo}, {hi}].")


# Scales the kernels take as fp32 numbers: normal fp32, and so is their reciprocal (reciprocal_fp32). Outside this
# range Triton types a Python float as fp64 (subnormal or beyond fp32) and the kernels' fp32 bit tricks fail.
FP32_SCALE_MIN = 2.0 ** -126
FP32_SCALE_MAX = 2.0 ** 126


def check_fp32_scale(entry: str, name: str, value: float) -> None:
    """A positive scale whose fp32 value and fp32 reciprocal are both normal numbers (NaN, 0, inf refused)."""
    if not FP32_SCALE_MIN <= value <= FP32_SCALE_MAX:
        raise KernelInputError(f"{entry}: {name}={value}; it must be a normal fp32 number in [2**-126, 2**126] "
                               "(> 0, with a normal fp32 reciprocal).")


# Zero points of re-quantizing epilogues: any integer exact in fp32, where every kernel adds it (Triton, csrc/quantize.h,
# the reference). The engine's activation grids can lie outside int8: a quantizer calibrated on positive values (a
# max-pooled head input) has a negative zero point, shifted by -128 with its codes; an int8 bound refused such models.
ZERO_POINT_BOUND = 2 ** 24


def check_requant_grid(entry: str, out_scale: float, out_zero: int, out_qmin: int, out_qmax: int) -> None:
    """The int8 output grid of a fused re-quantizing epilogue (GEMM, attention, LayerNorm): codes in
    -128 <= qmin <= qmax <= 127 (wider ones would wrap in the int8 store), |out_zero| under ``ZERO_POINT_BOUND``."""
    check_fp32_scale(entry, "out_scale", out_scale)
    check_int_range(entry, "out_qmin", out_qmin, -128, 127)
    check_int_range(entry, "out_qmax", out_qmax, out_qmin, 127)
    check_int_range(entry, "out_zero", out_zero, -ZERO_POINT_BOUND, ZERO_POINT_BOUND - 1)


def check_requant_columns(entry: str, grid: torch.Tensor) -> None:
    """Per-column grids, rows scale, zero, qmin, qmax (a 5th row, 1 / scale, is not read), under the rules of
    :func:`check_requant_grid` with zero points up to ``ZERO_POINT_BOUND`` (the qkv grids are the engine's q, k, v
    activation grids; both kernels add the zero in fp32). Only for CPU tensors: on CUDA reading the values back would
    sync with the device on every launch, so a CUDA grid goes unchecked (the engine builds its grids once per layer).
    A grid is checked once per version: the engine passes the same one on every forward (checking it each time cost
    ~10% of a batch-1 native forward); writing into it bumps its version and it is checked again."""
    if grid.device.type != "cpu" or grid.shape[1] == 0:
        return
    # Kept on the base tensor: the native backend passes a fresh view (grid[:4]) of the same buffer every call.
    owner = grid if grid._base is None else grid._base
    key = (grid._version, grid.data_ptr(), grid.shape[0], grid.shape[1])  # which view, and whether written since
    if getattr(owner, "_dfqvit_checked", None) == key:
        return
    scale, zero, qmin, qmax = grid[:4].double()
    bound = ZERO_POINT_BOUND
    ok = ((scale >= FP32_SCALE_MIN) & (scale <= FP32_SCALE_MAX) & (zero >= -bound) & (zero < bound)
          & (qmin >= -128) & (qmin <= qmax) & (qmax <= 127) & (grid[1:4] == grid[1:4].round()).all(dim=0))
    if not bool(ok.all()):  # NaN fails every comparison
        col = int((~ok).nonzero()[0])
        raise KernelInputError(
            f"{entry}: out_grid column {col} has (scale, zero, qmin, qmax) = {tuple(grid[:4, col].tolist())}; each "
            "column needs a normal fp32 scale in [2**-126, 2**126] and integers -128 <= qmin <= qmax <= 127, "
            "|zero| < 2**24.")
    owner._dfqvit_checked = key


def check_layernorm_eps(entry: str, eps: float) -> None:
    if not 0 < eps < float("inf"):
        raise KernelInputError(f"{entry}: eps={eps}; it must be a finite number > 0.")


# Softmax quantizers of the attention kernels (constexpr P_MODE).
P_MODE_LOG2 = 0
P_MODE_LINEAR = 1


def check_attention_scalars(entry: str, q_zero: int, k_zero: int, v_zero: int, p_mode: int, p_param: float,
                            p_bits: int, out_dtype: torch.dtype) -> None:
    """The attention arguments that are numbers (the tensors are checked by ``attention.check_attention_args``, or by
    the native kernel itself). Not ``p_zero``: the native kernel takes any (int16 or float64 P.V), the Triton one
    only [0, 2**p_bits - 1] (``check_attention_args``)."""
    for name, zero in (("q_zero", q_zero), ("k_zero", k_zero), ("v_zero", v_zero)):
        check_int_range(entry, name, zero, -128, 127)
    if not 1 <= int(p_bits) <= 8:
        raise KernelInputError(f"{entry}: p_bits={p_bits}; allowed 1..8.")
    if p_mode == P_MODE_LOG2:
        check_fp32_scale(entry, "p_delta", p_param)  # the largest log2 level
    elif p_mode == P_MODE_LINEAR:
        check_fp32_scale(entry, "p_scale", p_param)
    else:
        raise KernelInputError(f"{entry}: p_mode={p_mode}; allowed {P_MODE_LOG2} (log2 softmax codes) or "
                               f"{P_MODE_LINEAR} (linear).")
    check_attention_out_dtype(entry, out_dtype)


ATTENTION_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_attention_out_dtype(entry: str, out_dtype: torch.dtype) -> None:
    if out_dtype not in ATTENTION_OUT_DTYPES:
        raise KernelInputError(f"{entry}: out_dtype={out_dtype}; allowed float16, bfloat16, float32.")


def reciprocal_fp32(scale: float) -> float:
    """``RN(1 / fp32(scale))`` in fp32 (IEEE division), the ``inv_scale`` of :func:`divide_rn`. numpy scalars, not
    torch tensors: it runs on every kernel launch."""
    return float(np.float32(1.0) / np.float32(scale))


def torch_dtype_to_triton(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(int(n))
