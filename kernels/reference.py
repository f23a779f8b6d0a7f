"""Pure-PyTorch reference of every kernel's math (no triton import, ever).

The quantization functions at the top are the single source of truth for rounding: the fake-quant
modules in ``dfqvit.quant`` call them, and every Triton kernel must reproduce them bit for bit
(true division ``x / scale`` in fp32, round half to even = ``torch.round`` = ``rint``).
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import portable_math


def uniform_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """SPDFQ eq. 1: ``clamp(round(x / scale) + zero_point, qmin, qmax)``; integral values, x's dtype.

    ``scale`` and ``zero_point`` broadcast against ``x`` (scalars for per-tensor, shaped for per-channel). NaN stays
    NaN (the fake-quant model returns NaN for a NaN input); :func:`quantize_codes` gives integer codes.
    """
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def quantize_codes(x: torch.Tensor, scale, zero_point, qmin, qmax, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """:func:`uniform_quantize` as integer codes of ``dtype``. NaN gives ``qmin``, as in the native (``fmax``) and
    Triton kernels: ``torch.clamp`` keeps NaN, whose cast to an integer is undefined (0 on x86)."""
    q = uniform_quantize(x, scale, zero_point, qmin, qmax)
    if isinstance(qmin, torch.Tensor):
        q = torch.where(q.isnan(), qmin, q)
    else:
        q = q.nan_to_num_(nan=float(qmin))  # in place: q is a new tensor, without inf after the clamp
    return q.to(dtype)


def uniform_dequantize(q: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """Inverse map of :func:`uniform_quantize` onto the grid: ``scale * (q - zero_point)``."""
    return (q - zero_point) * scale


def log2_quantize(p: torch.Tensor, delta, bits: int) -> torch.Tensor:
    """SPDFQ eq. 2 with the zero-mask convention of FQ-ViT / RepQ-ViT.

    Returns exponent codes ``k = clamp(round(-log2(p / delta)), 0)`` as integral values of p's dtype.
    Exponents at or beyond ``2**bits`` cannot be stored; they get the code ``2**bits``, which
    dequantizes to exactly 0 (an underflowed probability), not to the smallest level. The rounding of
    ``-log2`` is exact (``portable_math.round_neg_log2``: exponent and mantissa, no libm ``log2``).
    """
    levels = 2 ** bits
    # Clamp the ratio first: softmax underflows to 0; any ratio this small lands in the zero bin anyway.
    ratio = torch.clamp(p / delta, min=2.0 ** -(levels + 2))
    k = torch.clamp(portable_math.round_neg_log2(ratio), min=0, max=levels)
    return k.to(p.dtype)


def log2_dequantize(codes: torch.Tensor, delta, bits: int) -> torch.Tensor:
    """``delta * 2**-k`` for stored codes, 0 for the underflow code ``2**bits``."""
    levels = 2 ** bits
    value = delta * torch.exp2(-codes)
    return torch.where(codes >= levels, torch.zeros_like(value), value)


# ===================================================================================================
# Everything below is the reference of one kernel family each (packing, qgemm, attention, act_quant).
# Each function has the same arguments as the torch.library op it mirrors and is that op's CPU
# implementation. Integer parts are computed in int64 (exact); float parts follow the kernel's order
# of fp32 operations so that results match bit for bit where the hardware does not contract or
# approximate (the interpreter), and within the tolerance stated in the tests otherwise.
# ===================================================================================================

LOG2E = 1.4426950408889634  # same constant as the kernels (kernels/_common.py)


FP32_EXACT_SUM = 2 ** 24   # integers below this are exact in fp32, and so is any sum of them that stays below
FP64_EXACT_SUM = 2 ** 53


def ieee_fp32_matmul(device: torch.device) -> bool:
    """Whether fp32 matmuls on ``device`` are plain IEEE fp32: on the CPU unless the user allowed a reduced
    precision (``torch.set_float32_matmul_precision``, oneDNN's bf16 / tf32 fp32 math); never assumed on CUDA
    (TF32). Unknown counts as reduced (the callers then take float64, exact either way)."""
    return device.type == "cpu" and _cpu_fp32_matmul_precision() == "ieee"


def _cpu_fp32_matmul_precision() -> str:
    """oneDNN's fp32 matmul precision: the per-backend setting, inherited upward while "none" (all "none": IEEE).
    Not the legacy torch.get_float32_matmul_precision(), which raises once a caller mixed the two APIs
    (torch.backends.cuda.matmul.fp32_precision = "tf32", a common GPU line, made every torch-backend forward
    raise); it is read only on a PyTorch without the per-backend API."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    nodes = (getattr(mkldnn, "matmul", None), mkldnn, torch.backends)
    if hasattr(nodes[0], "fp32_precision"):  # the per-backend API (it mirrors the legacy setting too)
        return next((node.fp32_precision for node in nodes if getattr(node, "fp32_precision", "none") != "none"),
                    "ieee")
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        return "unknown"
    return "ieee" if legacy == "highest" else legacy


def _exact_matmul(a: torch.Tensor, b: torch.Tensor, bound: float) -> torch.Tensor:
    """``a @ b`` of integer-valued tensors, every entry exact: on fp32 BLAS when ``bound`` (at least
    ``max|a| * max|b| * K``, which bounds every product and partial sum) is below 2**24 and fp32 matmul is IEEE,
    else float64 below 2**53, else int64. PyTorch's integer matmul on the CPU does not use BLAS (~50x slower);
    on float BLAS any summation order is exact when every partial sum is an integer the format holds (fp32:
    ~2.3x faster than float64 on the CIFAR layers)."""
    if bound < FP32_EXACT_SUM and ieee_fp32_matmul(a.device):
        return a.to(torch.float32) @ b.to(torch.float32)
    if bound < FP64_EXACT_SUM:
        return a.to(torch.float64) @ b.to(torch.float64)
    return a.to(torch.int64) @ b.to(torch.int64)


def exact_matmul_fp32(a: torch.Tensor, b: torch.Tensor, bound: float) -> torch.Tensor:
    """``a @ b`` of integer-valued tensors as fp32: each entry the exact integer, rounded once to fp32 (what
    the kernels' epilogues start from). ``bound``: as in :func:`_exact_matmul`."""
    return _exact_matmul(a, b, bound).to(torch.float32)


def exact_int_matmul(a: torch.Tensor, b: torch.Tensor, max_abs_a: int = 255, max_abs_b: int = 255) -> torch.Tensor:
    """``a @ b`` of integer-valued tensors with ``|a| <= max_abs_a``, ``|b| <= max_abs_b``, exact, as int64."""
    return _exact_matmul(a, b, max_abs_a * max_abs_b * a.shape[-1]).to(torch.int64)


def centered(codes: torch.Tensor, zero) -> Tuple[torch.Tensor, int]:
    """(codes - zero as fp32, a bound on |codes - zero|): exact for integer codes of up to 24 bits. ``zero``: an int or
    a tensor that broadcasts against ``codes``. The bound is the data's maximum, except for int8 / uint8 codes under
    torch.jit.trace: there it is their dtype's range, since a maximum read from the example input would be baked
    into the trace and could pick fp32 sums that are not exact for another input."""
    c = codes.to(torch.float32)
    c = c - (zero.to(torch.float32) if isinstance(zero, torch.Tensor) else float(zero))
    if torch.jit.is_tracing() and codes.dtype in (torch.int8, torch.uint8):
        info = torch.iinfo(codes.dtype)
        largest_zero = int(zero.abs().amax()) if isinstance(zero, torch.Tensor) else abs(int(zero))
        return c, max(-info.min, info.max) + largest_zero
    return c, int(c.abs().amax()) if c.numel() else 0


# --- packing ---------------------------------------------------------------------------------------

def packed_row_bytes(k: int, storage_bits: int, group_k: int) -> int:
    """Bytes per output row of a packed weight: K padded up to a multiple of ``group_k``, then
    ``storage_bits / 8`` bytes per position (int8 rows are not padded)."""
    if storage_bits == 8:
        return k
    k_padded = -(-k // group_k) * group_k
    return k_padded * storage_bits // 8


def _pad_k(codes: torch.Tensor, group_k: int) -> torch.Tensor:
    n, k = codes.shape
    k_padded = -(-k // group_k) * group_k
    out = torch.zeros((n, k_padded), dtype=torch.uint8, device=codes.device)
    out[:, :k] = codes.to(torch.uint8)
    return out


def pack_int4_reference(codes: torch.Tensor, group_k: int) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, Kp/2) uint8, layout ``int4_half_split`` (see packing.PackedLayout).

    Inside each group of ``group_k`` K positions, byte j holds position j (low nibble) and position
    j + group_k/2 (high nibble). K is zero-padded to a multiple of ``group_k``.
    """
    c = _pad_k(codes, group_k)
    n, k_padded = c.shape
    c = c.view(n, k_padded // group_k, 2, group_k // 2)
    packed = c[:, :, 0, :] | (c[:, :, 1, :] << 4)
    return packed.reshape(n, k_padded // 2).contiguous()


def unpack_int4_reference(packed: torch.Tensor, k: int, group_k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_reference`: (N, Kp/2) uint8 -> (N, k) uint8 codes."""
    n, row_bytes = packed.shape
    p = packed.view(n, row_bytes // (group_k // 2), 1, group_k // 2)
    codes = torch.cat([p & 0xF, p >> 4], dim=2)
    return codes.reshape(n, 2 * row_bytes)[:, :k].contiguous()  # explicit sizes: -1 is ambiguous for N = 0


def pack_int3_reference(codes: torch.Tensor, group_k: int) -> torch.Tensor:
    """(N, K) codes in [0, 7] -> (N, 3*Kp/8) uint8, layout ``int3_bitplanes`` (see packing.PackedLayout).

    Each group of ``group_k`` positions becomes ``group_k/4`` bytes of the 2-bit plane (byte r holds the
    low two bits of positions r + f*group_k/4 at bits 2f..2f+1, f = 0..3) followed by ``group_k/8``
    bytes of the 1-bit plane (byte r holds bit 2 of position r + i*group_k/8 at bit i, i = 0..7).
    """
    c = _pad_k(codes, group_k)
    n, k_padded = c.shape
    groups = k_padded // group_k
    low = (c & 0x3).view(n, groups, 4, group_k // 4)
    plane2 = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
    high = (c >> 2).view(n, groups, 8, group_k // 8)
    plane1 = torch.zeros_like(high[:, :, 0])
    for i in range(8):
        plane1 |= high[:, :, i] << i
    return torch.cat([plane2, plane1], dim=2).reshape(n, groups * 3 * group_k // 8).contiguous()


def unpack_int3_reference(packed: torch.Tensor, k: int, group_k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int3_reference`: (N, 3*Kp/8) uint8 -> (N, k) uint8 codes."""
    n, row_bytes = packed.shape
    groups = row_bytes // (3 * group_k // 8)
    p = packed.view(n, groups, 3 * group_k // 8)
    plane2, plane1 = p[:, :, : group_k // 4], p[:, :, group_k // 4:]
    low = torch.stack([(plane2 >> (2 * f)) & 0x3 for f in range(4)], dim=2).reshape(n, groups, group_k)
    high = torch.stack([(plane1 >> i) & 0x1 for i in range(8)], dim=2).reshape(n, groups, group_k)
    return (low | (high << 2)).reshape(n, groups * group_k)[:, :k].contiguous()


def pack_weight_reference(codes: torch.Tensor, storage_bits: int, group_k: int) -> torch.Tensor:
    """Op ``dfqvit::pack_weight``: dispatch on ``storage_bits`` (3 or 4)."""
    return pack_int4_reference(codes, group_k) if storage_bits == 4 else pack_int3_reference(codes, group_k)


def unpack_weight_reference(packed: torch.Tensor, storage_bits: int, k: int, group_k: int) -> torch.Tensor:
    """Op ``dfqvit::unpack_weight``: dispatch on ``storage_bits`` (3 or 4)."""
    if storage_bits == 4:
        return unpack_int4_reference(packed, k, group_k)
    return unpack_int3_reference(packed, k, group_k)


def unpack_any_reference(w_packed: torch.Tensor, storage_bits: int, k: int, group_k: int) -> torch.Tensor:
    """Weight codes as int64 (N, K) for any storage (int8 rows are returned as they are)."""
    if storage_bits == 8:
        return w_packed.to(torch.int64)
    return unpack_weight_reference(w_packed, storage_bits, k, group_k).to(torch.int64)


# --- qgemm -----------------------------------------------------------------------------------------

def _qgemm_accumulator(a: torch.Tensor, a_zero: int, w_codes: torch.Tensor, w_zero: torch.Tensor) -> torch.Tensor:
    """``sum_k (A[m,k] - a_zero) * (W[n,k] - w_zero[n])`` (M, N), every entry exact (fp32, float64 or int64)."""
    a_c, a_max = centered(a, int(a_zero))
    w_c, w_max = centered(w_codes, w_zero[:, None])
    return _exact_matmul(a_c, w_c.T, a_max * w_max * a.shape[-1])


def qgemm_accumulator_fp32(a: torch.Tensor, a_zero: int, w_codes: torch.Tensor,
                           w_zero: torch.Tensor) -> torch.Tensor:
    """``sum_k (A[m,k] - a_zero) * (W[n,k] - w_zero[n])`` (M, N): the exact integer rounded once to fp32."""
    return _qgemm_accumulator(a, a_zero, w_codes, w_zero).to(torch.float32)


def qgemm_accumulator_reference(a: torch.Tensor, a_zero: int, w_codes: torch.Tensor,
                                w_zero: torch.Tensor) -> torch.Tensor:
    """Exact ``sum_k (A[m,k] - a_zero) * (W[n,k] - w_zero[n])`` as int32 (M, N); W as unpacked codes."""
    return _qgemm_accumulator(a, a_zero, w_codes, w_zero).to(torch.int32)


def gemm_epilogue_reference(acc_fp32: torch.Tensor, row_scale: torch.Tensor, bias, gelu: bool, residual,
                            out_scale, out_zero: int, out_qmin: int, out_qmax: int,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """The fused epilogue, in the kernel's order: scale, + bias, GELU, + residual, re-quantize/cast."""
    y = acc_fp32 * row_scale[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    if gelu:
        y = portable_math.gelu(y)
    if residual is not None:
        y = y + residual.to(torch.float32)
    if out_scale is not None:
        return quantize_codes(y, float(out_scale), float(out_zero), out_qmin, out_qmax)
    return y.to(out_dtype)


def qgemm_reference(a: torch.Tensor, a_scale: float, a_zero: int, w_packed: torch.Tensor,
                    w_scale: torch.Tensor, w_zero: torch.Tensor, w_col_sums: torch.Tensor,
                    bias, residual, storage_bits: int, k: int, group_k: int, gelu: bool,
                    out_scale, out_zero: int, out_qmin: int, out_qmax: int,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """Op ``dfqvit::qgemm`` (W3/W4/W8 x A8):

    ``y = a_scale * w_scale[n] * sum_k (A - a_zero)(W - w_zero[n]) + bias[n]``, then optional GELU,
    optional ``+ residual``, then ``uniform_quantize(y, out_scale, out_zero, out_qmin, out_qmax)`` as int8
    if ``out_scale`` is given, else ``y`` cast to ``out_dtype``. ``w_col_sums`` is not needed here (the
    kernel uses it for the zero-point correction); it is checked against the codes by the tests.
    """
    codes = unpack_any_reference(w_packed, storage_bits, k, group_k)
    acc = qgemm_accumulator_fp32(a, a_zero, codes, w_zero)  # fp32 of the int32 accumulator, as the kernels
    row_scale = torch.tensor(a_scale, dtype=torch.float32) * w_scale.to(torch.float32)
    return gemm_epilogue_reference(acc, row_scale, bias, gelu, residual, out_scale,
                                   out_zero, out_qmin, out_qmax, out_dtype)


def qgemm_w16_reference(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                        w_zero: torch.Tensor, bias, residual, storage_bits: int, k: int, group_k: int,
                        gelu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Op ``dfqvit::qgemm_w16`` (weight-only, fp16/bf16 activations):
    ``y = w_scale[n] * sum_k x[m,k] (W[n,k] - w_zero[n]) + bias[n]``, GELU, + residual, cast.

    Products ``x * (W - w_zero)`` are exact in fp32; only the summation order differs from the kernel.
    """
    codes = unpack_any_reference(w_packed, storage_bits, k, group_k)
    w = (codes - w_zero.to(torch.int64)[:, None]).to(torch.float32)
    acc = x.to(torch.float32) @ w.T
    return gemm_epilogue_reference(acc, w_scale.to(torch.float32), bias, gelu, residual, None, 0, 0, 0,
                                   out_dtype)


# --- attention -------------------------------------------------------------------------------------

def attention_bias_mask_reference(bias, mask, batch: int, heads: int, seq: int):
    """The additive fp32 term before softmax, broadcast to (B, H, N, N), or None.

    ``bias`` broadcasts to (B, H, N, N) (a Swin relative-position bias is (H, N, N)); ``mask`` is
    (nW, N, N) and batch index b uses window ``b % nW`` (Swin's shifted-window mask, with the batch
    laid out as image-major, window-minor).
    """
    terms = []
    if bias is not None:
        terms.append(bias.to(torch.float32).expand(batch, heads, seq, seq))
    if mask is not None:
        window = torch.arange(batch, device=mask.device) % mask.shape[0]
        terms.append(mask.to(torch.float32)[window][:, None].expand(batch, heads, seq, seq))
    return terms


def attention_probs_reference(q: torch.Tensor, k: torch.Tensor, q_scale: float, q_zero: int,
                              k_scale: float, k_zero: int, sm_scale: float, bias, mask) -> torch.Tensor:
    """Softmax probabilities (fp32, B x H x N x N) exactly as the kernels form them: an exact int32
    ``QK^T`` with zero points, times ``fp32(sm_scale * q_scale * k_scale * log2(e))``, plus
    ``bias * log2(e)`` and ``mask * log2(e)``, then ``exp2(t - max t) / sum`` with the portable ``exp2``
    and the order-independent fixed-point row sum of ``portable_math``."""
    b, h, n, _ = q.shape
    q_c, q_max = centered(q, int(q_zero))
    k_c, k_max = centered(k, int(k_zero))
    acc = exact_matmul_fp32(q_c, k_c.transpose(-1, -2), q_max * k_max * q.shape[-1])
    qk_scale_log2 = torch.tensor(sm_scale * q_scale * k_scale * LOG2E, dtype=torch.float32)
    t = acc * qk_scale_log2
    log2e = torch.tensor(LOG2E, dtype=torch.float32)
    for term in attention_bias_mask_reference(bias, mask, b, h, n):
        t = t + term * log2e
    e = portable_math.exp2(t - t.amax(dim=-1, keepdim=True))
    return e / portable_math.row_sum(e)


def attention_log2_codes_reference(q, k, q_scale, q_zero, k_scale, k_zero, sm_scale, bias, mask,
                                   p_delta: float, p_bits: int) -> torch.Tensor:
    """Log2 codes of the softmax (int16, B x H x N x N): ``log2_quantize(p, p_delta, p_bits)``."""
    p = attention_probs_reference(q, k, q_scale, q_zero, k_scale, k_zero, sm_scale, bias, mask)
    return log2_quantize(p, p_delta, p_bits).to(torch.int16)


def attention_linear_codes_reference(q, k, q_scale, q_zero, k_scale, k_zero, sm_scale, bias, mask,
                                     p_scale: float, p_zero: int, p_bits: int) -> torch.Tensor:
    """Linear codes of the softmax (int16): ``uniform_quantize(p, p_scale, p_zero, 0, 2**p_bits - 1)``."""
    p = attention_probs_reference(q, k, q_scale, q_zero, k_scale, k_zero, sm_scale, bias, mask)
    return quantize_codes(p, float(p_scale), float(p_zero), 0, 2 ** p_bits - 1, torch.int16)


def log2_pv_shift(p_bits: int) -> int:
    """Fixed-point position S of the exact log2 P.V: level k contributes ``(v - v_zero) << (S - k)``.
    S = 2**p_bits - 1 (every level) up to 32; codes above 32 (8-bit log2: p < 2**-32 delta) add nothing,
    which keeps the integer sum below 2**53 (exact in float64 and int64)."""
    return min(2 ** p_bits - 1, 32)


def _attention_pv(weights: torch.Tensor, v: torch.Tensor, v_zero: int, scale: float,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``(sum_j weights[.., j] * (v_j - v_zero)) * scale`` with integer weights: the sum is exact (float BLAS on
    integers, ``exact_matmul_fp32``), rounded once to fp32, then scaled in fp32."""
    v_c, v_max = centered(v, int(v_zero))
    max_weight = int(weights.abs().amax()) if weights.numel() else 0
    acc = exact_matmul_fp32(weights, v_c, max_weight * v_max * weights.shape[-1])
    return (acc * torch.tensor(scale, dtype=torch.float32)).to(out_dtype)


def attention_log2_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: float,
                             q_zero: int, k_scale: float, k_zero: int, v_scale: float, v_zero: int,
                             sm_scale: float, bias, mask, p_delta: float, p_bits: int,
                             out_dtype: torch.dtype) -> torch.Tensor:
    """Op ``dfqvit::attention_log2``: ``log2_dequantize(log2_quantize(softmax)) @ (v - v_zero) * v_scale``.

    P.V by shifts and adds: ``out = fp32(sum_j (v_j - v_zero) * 2**(S - k_j)) * 2**-S * fp32(delta * v_scale)``
    with the exact integer sum of :func:`log2_pv_shift` (the underflow code contributes 0).
    """
    codes = attention_log2_codes_reference(q, k, q_scale, q_zero, k_scale, k_zero, sm_scale, bias, mask,
                                           p_delta, p_bits).to(torch.int32)
    shift = log2_pv_shift(p_bits)
    # 2**(S - k) exactly (S <= 32), 0 for the levels past S
    weights = portable_math.power_of_two((shift - codes).clamp_(min=-126)).masked_fill_(codes > shift, 0.0)
    out = _attention_pv(weights, v, v_zero, 2.0 ** -shift, torch.float32)
    return (out * torch.tensor(float(p_delta) * float(v_scale), dtype=torch.float32)).to(out_dtype)


def attention_linear_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: float,
                               q_zero: int, k_scale: float, k_zero: int, v_scale: float, v_zero: int,
                               sm_scale: float, bias, mask, p_scale: float, p_zero: int, p_bits: int,
                               out_dtype: torch.dtype) -> torch.Tensor:
    """Op ``dfqvit::attention_linear``: uniform (linear) softmax quantizer instead of log2;
    ``out = fp32(sum_j (c_j - p_zero)(v_j - v_zero)) * fp32(p_scale * v_scale)`` (exact integer sum)."""
    codes = attention_linear_codes_reference(q, k, q_scale, q_zero, k_scale, k_zero, sm_scale, bias, mask,
                                             p_scale, p_zero, p_bits)
    weights = codes.to(torch.int64) - int(p_zero)
    return _attention_pv(weights, v, v_zero, float(p_scale) * float(v_scale), out_dtype)


# --- LayerNorm + quantize --------------------------------------------------------------------------

def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in the kernels' fp32 order (two-pass mean/variance, biased variance,
    ``(x - mean) * (1 / sqrt(var + eps)) * weight + bias``); equals ``F.layer_norm`` up to fp32 rounding.
    Both sums are ``portable_math.sequential_sum`` (float64, index order), which the native kernel and the
    interpreted Triton kernel repeat bit for bit; compiled for a GPU, the Triton kernel sums in fp32 as a tree
    (and contracts the affine into FMAs): codes within one there (kernels/act_quant.py)."""
    xf = x.to(torch.float32)
    c = xf.shape[-1]
    mean = portable_math.sequential_sum(xf) / c
    centered = xf - mean
    var = portable_math.sequential_sum(centered * centered) / c
    root = portable_math.sqrt(var + torch.tensor(eps, dtype=torch.float32))
    rstd = torch.ones_like(root) / root
    return centered * rstd * weight.to(torch.float32) + bias.to(torch.float32)


def layernorm_quant_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                              out_scale: float, out_zero: int, out_qmin: int, out_qmax: int) -> torch.Tensor:
    """Op ``dfqvit::layernorm_quant``: ``uniform_quantize(layer_norm(x), out_scale, out_zero, qmin, qmax)``
    as int8, same shape as ``x``."""
    y = layer_norm_reference(x, weight, bias, eps)
    return quantize_codes(y, float(out_scale), float(out_zero), out_qmin, out_qmax)
