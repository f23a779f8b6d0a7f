"""Weight packing: int4 two per byte, int3 as a 2-bit plane plus a 1-bit plane, int8 rows as they are.

The layouts are chosen for the GEMM in ``qgemm.py``: one shift and one mask turn a tile of packed bytes
into a contiguous run of K positions, so unpacking never needs a shuffle (see :class:`PackedLayout`).
Packing runs once, when the engine is built; ``forward`` only ever reads packed bytes.

Three implementations share one contract (same arguments, bit-identical bytes):
``reference.pack_weight_reference`` (PyTorch, the ``dfqvit::pack_weight`` CPU op), the Triton kernels
below (``pack_weight_triton``, the CUDA op), and the optional native extension ``dfqvit._C``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import reference
from ._common import check_tensor, require_triton_device
from .errors import KernelInputError

# Default packing group along K. A group's halves (int4) or quarters (int3) are what one tl.dot consumes,
# so they must be >= 16 positions for tensor cores: 64 -> 32-wide int4 halves, 128 -> 32-wide int3 quarters.
DEFAULT_GROUP_K = {4: 64, 3: 128}


class PackedLayout(str, enum.Enum):
    """How weight codes of an ``nn.Linear`` weight (N, K) are stored, row by row (one row per output).

    ``INT4_HALF_SPLIT``: K is zero-padded to a multiple of ``group_k`` (G). Within group g, byte j
    (j < G/2) holds position ``g*G + j`` in its low nibble and position ``g*G + j + G/2`` in its high
    nibble. Worked byte, G = 64: codes W[n, 3] = 5 (0b0101) and W[n, 35] = 12 (0b1100) share byte 3 of
    the row: ``5 | 12 << 4 = 0b1100_0101 = 0xC5``. ``byte & 0xF`` over a tile of G/2 bytes gives K
    positions 0..31 in order, ``byte >> 4`` gives 32..63: two contiguous half-tiles, no interleave.
    Row size: ``Kp / 2`` bytes.

    ``INT3_BITPLANES``: K is zero-padded to a multiple of G; each group is 3G/8 bytes, first a 2-bit
    plane of G/4 bytes, then a 1-bit plane of G/8 bytes (8 codes in 3 bytes). 2-bit byte r holds the low
    two bits of positions ``r + f*G/4`` at bits ``2f..2f+1`` (f = 0..3); 1-bit byte r holds bit 2 of
    positions ``r + i*G/8`` at bit i (i = 0..7). Worked byte, G = 128: W[n, 5] = 6 (0b110) puts
    ``0b10`` at bits 0..1 of 2-bit byte 5 and its high bit 1 at bit 0 of 1-bit byte 5 (byte 32 + 5 = 37
    of the group); W[n, 37] = 3 (0b011) puts ``0b11`` at bits 2..3 of 2-bit byte 5 and 0 at bit 2 of
    1-bit byte 5. Quarter f of a group is ``(plane2 >> 2f) & 3 | ((plane1 >> (2f + r // (G/8))) & 1) << 2``
    — again contiguous K positions. Row size: ``3 * Kp / 8`` bytes.

    ``INT8_ROWS``: the (N, K) int8 codes as they are (5- to 8-bit weights); no padding.
    """

    INT4_HALF_SPLIT = "int4_half_split"
    INT3_BITPLANES = "int3_bitplanes"
    INT8_ROWS = "int8_rows"

    @property
    def storage_bits(self) -> int:
        return {PackedLayout.INT4_HALF_SPLIT: 4, PackedLayout.INT3_BITPLANES: 3, PackedLayout.INT8_ROWS: 8}[self]

    @staticmethod
    def for_bits(bits: int) -> "PackedLayout":
        """The layout that stores weights of ``bits`` bits (3 -> int3 planes, 4 -> int4, 5..8 -> int8)."""
        if bits == 3:
            return PackedLayout.INT3_BITPLANES
        if bits == 4:
            return PackedLayout.INT4_HALF_SPLIT
        if 5 <= bits <= 8:
            return PackedLayout.INT8_ROWS
        raise KernelInputError(f"weight bits={bits} has no packed layout; allowed: 3, 4, 5, 6, 7, 8.")


@dataclass(frozen=True)
class PackedWeight:
    """A packed ``nn.Linear`` weight plus everything the GEMM epilogue needs; built once by
    :func:`pack_weight`.

    Fields:
        data: uint8 (N, packed_row_bytes) for int4/int3 layouts, int8 (N, K) for ``INT8_ROWS``.
        w_scale: fp32 (N,) per-output-channel scale.
        w_zero: int32 (N,) per-output-channel zero point (codes are unsigned: W - w_zero is the value).
        w_col_sums: int32 (N,) ``sum_k (W[n, k] - w_zero[n])`` over the true K: the GEMM's
            activation zero-point correction ``- a_zero * w_col_sums[n]``.
        n, k: logical weight shape (out_features, in_features).
        bits: the quantizer's bit width (3..8); ``layout`` follows from it.
        layout: a :class:`PackedLayout`.
        group_k: packing group along K (padding unit and the GEMM's BLOCK_K granularity); 1 for int8.
    """

    data: torch.Tensor
    w_scale: torch.Tensor
    w_zero: torch.Tensor
    w_col_sums: torch.Tensor
    n: int
    k: int
    bits: int
    layout: PackedLayout
    group_k: int

    @property
    def storage_bits(self) -> int:
        return self.layout.storage_bits

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "PackedWeight":
        return replace(self, data=self.data.to(device), w_scale=self.w_scale.to(device),
                       w_zero=self.w_zero.to(device), w_col_sums=self.w_col_sums.to(device))

    def unpack(self) -> torch.Tensor:
        """The (N, K) codes back (uint8 for int4/int3, int8 for int8 rows), via the reference."""
        if self.layout is PackedLayout.INT8_ROWS:
            return self.data.clone()
        return reference.unpack_weight_reference(self.data.cpu(), self.storage_bits, self.k,
                                                 self.group_k).to(self.device)


def packed_nbytes(weight: PackedWeight) -> int:
    """Bytes the packed weight occupies on the device: packed codes, scales, zero points, column sums."""
    return sum(t.numel() * t.element_size() for t in (weight.data, weight.w_scale, weight.w_zero,
                                                       weight.w_col_sums))


def _check_codes(entry: str, codes: torch.Tensor, storage_bits: int) -> None:
    check_tensor(entry, "codes", codes, dtypes=(torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64),
                 ndim=2)
    if codes.numel() == 0:
        raise KernelInputError(f"{entry}: codes has shape {tuple(codes.shape)}; both dims must be >= 1.")
    lo, hi = (0, 2 ** storage_bits - 1) if storage_bits in (3, 4) else (-128, 127)
    cmin, cmax = int(codes.min()), int(codes.max())
    if cmin < lo or cmax > hi:
        raise KernelInputError(
            f"{entry}: codes span [{cmin}, {cmax}] but {storage_bits}-bit storage holds [{lo}, {hi}]. "
            "Weight codes must be the quantizer's unsigned integers (int8 storage: shift by -128 first)."
        )


def _check_group_k(entry: str, storage_bits: int, group_k: int) -> None:
    # group_k / 8 bytes per 1-bit plane must be whole; powers of two keep tl.arange legal.
    if group_k < 16 or group_k & (group_k - 1):
        raise KernelInputError(f"{entry}: group_k={group_k}; allowed: a power of two >= 16 "
                               f"(default {DEFAULT_GROUP_K.get(storage_bits)}).")


INT8_ROW_ZERO_BOUND = 2048 - 128  # |W - w_zero| <= 2048 for int8 codes W: integers exact in fp16


def _check_w_zero(entry: str, w_zero: torch.Tensor, bits: int, storage_bits: int) -> None:
    """Zero points the GEMMs handle exactly, checked on the given values (before the int32 conversion, which would
    wrap 2**32 + 3 to 3).

    int4/int3: [2**bits - 128, 127], so that W - w_zero fits int8 (subtracted while unpacking, fed to int8 tensor
    cores). int8 rows: [-1920, 1919], so that |W - w_zero| <= 2048 is exact in the fp16 of the weight-only GEMM and
    the int32 row-sum correction ``a_rowsum * w_zero`` cannot overflow below K = 8,192. A quantizer's zero point lies
    outside its code range when a channel's weights all have one sign (an int8 bound refused such 8-bit rows).
    """
    if w_zero.is_floating_point() and not torch.equal(w_zero, w_zero.round()):
        raise KernelInputError(f"{entry}: w_zero must hold integers; got non-integral values.")
    if storage_bits in (3, 4):
        lo, hi = 2 ** storage_bits - 128, 127
        why = "so that W - w_zero fits int8 (a row whose weights all have one sign puts it outside)"
    else:
        lo, hi = -INT8_ROW_ZERO_BOUND, INT8_ROW_ZERO_BOUND - 1
        why = "(int8 rows: W - w_zero exact in fp16, the row-sum correction in int32)"
    zmin, zmax = w_zero.min().item(), w_zero.max().item()
    if zmin < lo or zmax > hi:
        raise KernelInputError(f"{entry}: w_zero spans [{zmin}, {zmax}]; {bits}-bit weights allow [{lo}, {hi}] {why}.")


def pack_weight(codes: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor, bits: int,
                group_k: int | None = None) -> PackedWeight:
    """Pack the (N, K) integer codes of a quantized ``nn.Linear`` weight for the GEMM (once, at build).

    Args:
        codes: integer (N, K); unsigned codes in [0, 2**bits - 1] for 3/4 bits; values that fit int8
            for 5..8 bits (8-bit unsigned codes must be shifted by -128 first, and ``w_zero`` with them).
        w_scale: (N,) per-output-channel scales (stored fp32).
        w_zero: (N,) integer zero points (stored int32): in [2**bits - 128, 127] for 3/4 bits (W - w_zero fits
            int8), in [-1920, 1919] for 5..8 bits (see ``_check_w_zero``).
        bits: weight bit width, 3..8.
        group_k: K packing group (power of two >= 16); defaults to 64 for int4 and 128 for int3.
    """
    entry = "pack_weight"
    layout = PackedLayout.for_bits(bits)
    storage_bits = layout.storage_bits
    _check_codes(entry, codes, storage_bits)
    n, k = codes.shape
    check_tensor(entry, "w_scale", w_scale, dtypes=(torch.float16, torch.bfloat16, torch.float32), shape=(n,))
    check_tensor(entry, "w_zero", w_zero, dtypes=(torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                                  torch.float32), shape=(n,))
    _check_w_zero(entry, w_zero, bits, storage_bits)
    w_zero_i32 = w_zero.to(torch.int32).contiguous()
    col_sums = (codes.to(torch.int64) - w_zero_i32.to(torch.int64)[:, None]).sum(dim=1).to(torch.int32)
    if layout is PackedLayout.INT8_ROWS:
        data, group_k = codes.to(torch.int8).contiguous(), 1
    else:
        group_k = DEFAULT_GROUP_K[storage_bits] if group_k is None else int(group_k)
        _check_group_k(entry, storage_bits, group_k)
        codes_u8 = codes.to(torch.uint8).contiguous()
        data = torch.ops.dfqvit.pack_weight(codes_u8, storage_bits, group_k)
    return PackedWeight(data=data, w_scale=w_scale.to(torch.float32).contiguous(), w_zero=w_zero_i32,
                        w_col_sums=col_sums.contiguous(), n=n, k=k, bits=bits, layout=layout, group_k=group_k)


# ---------------------------------------------------------------------------------------------------
# Triton pack / unpack (one program = BLOCK_N rows x one K group)
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _pack_kernel(codes_ptr, packed_ptr, N, K, stride_cn, stride_pn,
                 STORAGE_BITS: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    group = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < N
    k_base = group * GROUP_K
    src = codes_ptr + rows[:, None] * stride_cn
    if STORAGE_BITS == 4:
        j = tl.arange(0, GROUP_K // 2)[None, :]
        lo = tl.load(src + k_base + j, mask=row_ok & (k_base + j < K), other=0)
        hi = tl.load(src + k_base + GROUP_K // 2 + j, mask=row_ok & (k_base + GROUP_K // 2 + j < K), other=0)
        byte = lo | (hi << 4)
        tl.store(packed_ptr + rows[:, None] * stride_pn + group * (GROUP_K // 2) + j, byte, mask=row_ok)
    else:
        dst = packed_ptr + rows[:, None] * stride_pn + group * (3 * GROUP_K // 8)
        r2 = tl.arange(0, GROUP_K // 4)[None, :]
        plane2 = tl.zeros((BLOCK_N, GROUP_K // 4), dtype=tl.uint8)
        for f in tl.static_range(4):
            pos = k_base + f * (GROUP_K // 4) + r2
            c = tl.load(src + pos, mask=row_ok & (pos < K), other=0)
            plane2 = plane2 | ((c & 3) << (2 * f))
        tl.store(dst + r2, plane2, mask=row_ok)
        r1 = tl.arange(0, GROUP_K // 8)[None, :]
        plane1 = tl.zeros((BLOCK_N, GROUP_K // 8), dtype=tl.uint8)
        for i in tl.static_range(8):
            pos = k_base + i * (GROUP_K // 8) + r1
            c = tl.load(src + pos, mask=row_ok & (pos < K), other=0)
            plane1 = plane1 | (((c >> 2) & 1) << i)
        tl.store(dst + GROUP_K // 4 + r1, plane1, mask=row_ok)


@triton.jit
def _centered(code, zero, CENTER: tl.constexpr, out_ptr):
    """``code`` as stored (CENTER False), or ``code - zero`` converted to the output's dtype."""
    # if/else, not an early return: the GPU compiler type-checks both returns of a constexpr branch.
    if CENTER:
        out = (code.to(tl.int16) - zero).to(out_ptr.dtype.element_ty)
    else:
        out = code
    return out


@triton.jit
def _unpack_kernel(packed_ptr, codes_ptr, zero_ptr, N, K, stride_pn, stride_cn,
                   STORAGE_BITS: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   CENTER: tl.constexpr):
    pid_n = tl.program_id(0)
    group = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < N
    k_base = group * GROUP_K
    dst = codes_ptr + rows[:, None] * stride_cn
    zero = 0
    if CENTER:
        zero = tl.load(zero_ptr + rows, mask=rows < N, other=0).to(tl.int16)[:, None]
    if STORAGE_BITS == 4:
        j = tl.arange(0, GROUP_K // 2)[None, :]
        byte = tl.load(packed_ptr + rows[:, None] * stride_pn + group * (GROUP_K // 2) + j, mask=row_ok, other=0)
        tl.store(dst + k_base + j, _centered(byte & 0xF, zero, CENTER, codes_ptr), mask=row_ok & (k_base + j < K))
        tl.store(dst + k_base + GROUP_K // 2 + j, _centered(byte >> 4, zero, CENTER, codes_ptr),
                 mask=row_ok & (k_base + GROUP_K // 2 + j < K))
    else:
        src = packed_ptr + rows[:, None] * stride_pn + group * (3 * GROUP_K // 8)
        r = tl.arange(0, GROUP_K // 4)[None, :]
        plane2 = tl.load(src + r, mask=row_ok, other=0)
        # Each 1-bit byte serves two rows of a quarter: load it twice (r % (G/8)) and shift per row.
        plane1 = tl.load(src + GROUP_K // 4 + r % (GROUP_K // 8), mask=row_ok, other=0)
        for f in tl.static_range(4):
            shift = (2 * f + r // (GROUP_K // 8)).to(tl.uint8)
            code = ((plane2 >> (2 * f)) & 3) | (((plane1 >> shift) & 1) << 2)
            pos = k_base + f * (GROUP_K // 4) + r
            tl.store(dst + pos, _centered(code, zero, CENTER, codes_ptr), mask=row_ok & (pos < K))


_PACK_BLOCK_N = 16


def _check_packed(entry: str, packed: torch.Tensor, storage_bits: int, k: int, group_k: int) -> None:
    check_tensor(entry, "packed", packed, dtypes=(torch.uint8,), ndim=2, contiguous=True)
    expected = reference.packed_row_bytes(k, storage_bits, group_k)
    if packed.shape[1] != expected:
        raise KernelInputError(f"{entry}: packed has {packed.shape[1]} bytes per row; {storage_bits}-bit "
                               f"storage of k={k} with group_k={group_k} needs {expected}.")


def _check_storage_bits(entry: str, storage_bits: int) -> None:
    if storage_bits not in (3, 4):
        raise KernelInputError(f"{entry}: storage_bits={storage_bits}; allowed: 3, 4 (int8 rows need no packing).")


def pack_weight_triton(codes: torch.Tensor, storage_bits: int, group_k: int) -> torch.Tensor:
    """Triton packer, same contract as ``reference.pack_weight_reference`` (uint8 codes in range)."""
    entry = "pack_weight_triton"
    _check_storage_bits(entry, storage_bits)
    _check_group_k(entry, storage_bits, group_k)
    check_tensor(entry, "codes", codes, dtypes=(torch.uint8,), ndim=2, contiguous=True)
    require_triton_device(entry, _pack_kernel, [codes])
    n, k = codes.shape
    packed = torch.empty((n, reference.packed_row_bytes(k, storage_bits, group_k)), dtype=torch.uint8,
                         device=codes.device)
    grid = (triton.cdiv(n, _PACK_BLOCK_N), triton.cdiv(k, group_k))
    _pack_kernel[grid](codes, packed, n, k, codes.stride(0), packed.stride(0),
                       STORAGE_BITS=storage_bits, GROUP_K=group_k, BLOCK_N=_PACK_BLOCK_N)
    return packed


def unpack_weight_triton(packed: torch.Tensor, storage_bits: int, k: int, group_k: int) -> torch.Tensor:
    """Triton unpacker, same contract as ``reference.unpack_weight_reference``."""
    entry = "unpack_weight_triton"
    _check_storage_bits(entry, storage_bits)
    _check_group_k(entry, storage_bits, group_k)
    _check_packed(entry, packed, storage_bits, k, group_k)
    require_triton_device(entry, _unpack_kernel, [packed])
    n = packed.shape[0]
    codes = torch.empty((n, k), dtype=torch.uint8, device=packed.device)
    grid = (triton.cdiv(n, _PACK_BLOCK_N), triton.cdiv(k, group_k))
    _unpack_kernel[grid](packed, codes, packed, n, k, packed.stride(0), codes.stride(0),
                         STORAGE_BITS=storage_bits, GROUP_K=group_k, BLOCK_N=_PACK_BLOCK_N, CENTER=False)
    return codes


_CENTERED_BLOCK_N = 64  # 64 rows x one group per program: a few KB each, enough work per program


def unpack_centered_triton(packed: torch.Tensor, w_zero: torch.Tensor, storage_bits: int, k: int, group_k: int,
                           dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """``W - w_zero`` of packed int4/int3 weights as a dense (N, K) tensor of ``dtype``: int8 (|W - w_zero| <= 15
    for zero points in the code range) for the int8 tensor-core GEMM, or float16/bfloat16 (exact) for the
    weight-only one. The GEMM's unpack-first path (``qgemm.GemmConfig.unpack_first``) runs on it."""
    entry = "unpack_centered_triton"
    _check_storage_bits(entry, storage_bits)
    _check_group_k(entry, storage_bits, group_k)
    _check_packed(entry, packed, storage_bits, k, group_k)
    if dtype not in (torch.int8, torch.float16, torch.bfloat16):
        raise KernelInputError(f"{entry}: dtype={dtype}; allowed int8, float16, bfloat16.")
    check_tensor(entry, "w_zero", w_zero, dtypes=(torch.int32,), shape=(packed.shape[0],), contiguous=True)
    require_triton_device(entry, _unpack_kernel, [packed, w_zero])
    n = packed.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, _CENTERED_BLOCK_N), triton.cdiv(k, group_k))
    _unpack_kernel[grid](packed, out, w_zero, n, k, packed.stride(0), out.stride(0),
                         STORAGE_BITS=storage_bits, GROUP_K=group_k, BLOCK_N=_CENTERED_BLOCK_N, CENTER=True)
    return out


# ---------------------------------------------------------------------------------------------------
# torch.library ops: CPU = reference, CUDA = Triton
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("dfqvit::pack_weight", mutates_args=())
def pack_weight_op(codes: torch.Tensor, storage_bits: int, group_k: int) -> torch.Tensor:
    """Pack (N, K) uint8 codes into the int4/int3 layout (see :class:`PackedLayout`)."""
    _check_storage_bits("dfqvit::pack_weight", storage_bits)
    _check_group_k("dfqvit::pack_weight", storage_bits, group_k)
    check_tensor("dfqvit::pack_weight", "codes", codes, dtypes=(torch.uint8,), ndim=2)
    return reference.pack_weight_reference(codes, storage_bits, group_k)


@pack_weight_op.register_kernel("cuda")
def _pack_weight_cuda(codes, storage_bits, group_k):
    return pack_weight_triton(codes.contiguous(), storage_bits, group_k)


@pack_weight_op.register_fake
def _pack_weight_fake(codes, storage_bits, group_k):
    _check_storage_bits("dfqvit::pack_weight", storage_bits)
    _check_group_k("dfqvit::pack_weight", storage_bits, group_k)
    n, k = codes.shape
    return codes.new_empty((n, reference.packed_row_bytes(k, storage_bits, group_k)), dtype=torch.uint8)


@torch.library.custom_op("dfqvit::unpack_weight", mutates_args=())
def unpack_weight_op(packed: torch.Tensor, storage_bits: int, k: int, group_k: int) -> torch.Tensor:
    """Unpack an int4/int3 packed weight back to (N, k) uint8 codes."""
    _check_storage_bits("dfqvit::unpack_weight", storage_bits)
    _check_packed("dfqvit::unpack_weight", packed.contiguous(), storage_bits, k, group_k)
    return reference.unpack_weight_reference(packed.contiguous(), storage_bits, k, group_k)


@unpack_weight_op.register_kernel("cuda")
def _unpack_weight_cuda(packed, storage_bits, k, group_k):
    return unpack_weight_triton(packed.contiguous(), storage_bits, k, group_k)


@unpack_weight_op.register_fake
def _unpack_weight_fake(packed, storage_bits, k, group_k):
    _check_storage_bits("dfqvit::unpack_weight", storage_bits)
    return packed.new_empty((packed.shape[0], k), dtype=torch.uint8)
