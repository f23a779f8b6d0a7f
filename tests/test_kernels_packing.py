"""Packing: layouts worked by hand, pack -> unpack identity, Triton == reference bytes, PackedWeight, sizes."""
from __future__ import annotations

import pytest
import torch

from dfqvit.kernels import KernelInputError, PackedLayout, pack_weight, packed_nbytes, reference
from dfqvit.kernels.packing import pack_weight_triton, unpack_centered_triton, unpack_weight_triton
from kernel_utils import TRITON_DEVICE, random_weight, requires_triton

GEN = torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_k", [16, 32, 128])
@pytest.mark.parametrize("k", [1, 7, 40, 72, 100, 129])
def test_reference_pack_unpack_is_identity(bits, group_k, k):
    codes = torch.randint(0, 2 ** bits, (17, k), generator=GEN).to(torch.uint8)
    codes.view(-1)[: 2 ** bits] = torch.arange(2 ** bits)
    packed = reference.pack_weight_reference(codes, bits, group_k)
    assert packed.dtype == torch.uint8
    assert packed.shape == (17, reference.packed_row_bytes(k, bits, group_k))
    assert torch.equal(reference.unpack_weight_reference(packed, bits, k, group_k), codes)


def test_int4_worked_byte_from_the_docstring():
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 3], codes[0, 35] = 5, 12
    packed = reference.pack_int4_reference(codes, 64)
    assert packed.shape == (1, 32)
    assert int(packed[0, 3]) == 0xC5
    assert int(packed.sum()) == 0xC5


def test_int3_worked_bytes_from_the_docstring():
    codes = torch.zeros(1, 128, dtype=torch.uint8)
    codes[0, 5], codes[0, 37] = 6, 3
    packed = reference.pack_int3_reference(codes, 128)
    assert packed.shape == (1, 48)  # 3 * 128 / 8
    assert int(packed[0, 5]) == 0b1110  # 0b10 at bits 0..1 (pos 5), 0b11 at bits 2..3 (pos 37)
    assert int(packed[0, 32 + 5]) == 0b1  # high bit of pos 5 at bit 0 of 1-bit byte 5; pos 37's is 0
    assert int((packed != 0).sum()) == 2


def test_every_value_survives_at_every_position():
    for bits in (3, 4):
        levels = 2 ** bits
        codes = (torch.arange(levels * 64).reshape(levels, 64) + torch.arange(levels)[:, None]) % levels
        codes = codes.to(torch.uint8)
        packed = reference.pack_weight_reference(codes, bits, 64)
        assert torch.equal(reference.unpack_weight_reference(packed, bits, 64, 64), codes)


@requires_triton
@pytest.mark.parametrize("bits,group_k", [(4, 16), (4, 64), (3, 32), (3, 128)])
@pytest.mark.parametrize("k", [40, 100])
def test_triton_pack_matches_reference_bytes(bits, group_k, k):
    codes = torch.randint(0, 2 ** bits, (17, k), generator=GEN).to(torch.uint8)
    expected = reference.pack_weight_reference(codes, bits, group_k)
    packed = pack_weight_triton(codes.to(TRITON_DEVICE), bits, group_k)
    assert torch.equal(packed.cpu(), expected)
    assert torch.equal(unpack_weight_triton(packed, bits, k, group_k).cpu(), codes)


@requires_triton
@pytest.mark.parametrize("bits,group_k", [(4, 16), (3, 32)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float16])
def test_unpack_centered_is_codes_minus_zero_point(bits, group_k, dtype):
    """The unpack-first GEMM's input: W - w_zero, exact, for 70 rows (a full and a partial program) and odd K."""
    k = 100
    codes, scale, zero = random_weight(bits, 70, k, GEN)
    zero[0], zero[1] = 0, 2 ** bits - 1  # both ends of the zero-point range: W - w_zero spans -15..15
    w = pack_weight(codes, scale, zero, bits, group_k=group_k)
    got = unpack_centered_triton(w.data.to(TRITON_DEVICE), w.w_zero.to(TRITON_DEVICE), bits, k, group_k, dtype)
    assert got.dtype == dtype and got.shape == (70, k)
    assert torch.equal(got.cpu().to(torch.int32), codes.to(torch.int32) - zero[:, None])


@requires_triton
def test_unpack_centered_rejects_a_float32_output():
    codes, scale, zero = random_weight(4, 4, 32, GEN)
    w = pack_weight(codes, scale, zero, 4, group_k=16)
    with pytest.raises(KernelInputError, match="dtype=torch.float32"):
        unpack_centered_triton(w.data.to(TRITON_DEVICE), w.w_zero.to(TRITON_DEVICE), 4, 32, 16, torch.float32)


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_pack_weight_builds_a_consistent_packed_weight(bits):
    codes, scale, zero = random_weight(bits, 17, 72, GEN)
    weight = pack_weight(codes, scale, zero, bits)
    assert weight.layout is PackedLayout.for_bits(bits)
    assert (weight.n, weight.k, weight.bits) == (17, 72, bits)
    assert torch.equal(weight.unpack().to(torch.int64), codes.to(torch.int64))
    expected_col_sums = (codes.to(torch.int64) - zero.to(torch.int64)[:, None]).sum(1)
    assert torch.equal(weight.w_col_sums.to(torch.int64), expected_col_sums)
    assert weight.w_scale.dtype == torch.float32 and weight.w_zero.dtype == torch.int32
    if bits <= 4:
        assert weight.group_k == {3: 128, 4: 64}[bits]
        assert weight.data.shape == (17, reference.packed_row_bytes(72, bits, weight.group_k))
    else:
        assert weight.data.dtype == torch.int8 and weight.data.shape == (17, 72)


@pytest.mark.parametrize("name,n,k", [("deit_s.qkv", 1152, 384), ("deit_s.fc1", 1536, 384),
                                      ("deit_s.fc2", 384, 1536), ("vit_b.qkv", 2304, 768),
                                      ("vit_b.fc1", 3072, 768), ("vit_b.fc2", 768, 3072)])
def test_packed_bytes_meet_the_memory_targets(name, n, k):
    """Issue target: packed weight incl. scales <= 0.27x fp16 for int4 and <= 0.21x for int3."""
    fp16_bytes = n * k * 2
    for bits, limit in ((4, 0.27), (3, 0.21)):
        codes = torch.zeros(n, k, dtype=torch.uint8)
        weight = pack_weight(codes, torch.ones(n), torch.zeros(n, dtype=torch.int32), bits)
        assert packed_nbytes(weight) / fp16_bytes <= limit, (name, bits)


def test_layout_enum_is_a_str_enum_with_storage_bits():
    assert PackedLayout("int4_half_split") is PackedLayout.INT4_HALF_SPLIT
    assert [PackedLayout.for_bits(b).storage_bits for b in (3, 4, 5, 8)] == [3, 4, 8, 8]
    assert "0xC5" in PackedLayout.__doc__


def test_pack_op_opcheck():
    codes = torch.randint(0, 16, (5, 40), generator=GEN).to(torch.uint8)
    torch.library.opcheck(torch.ops.dfqvit.pack_weight.default, (codes, 4, 16))
    torch.library.opcheck(torch.ops.dfqvit.pack_weight.default, (codes & 7, 3, 32))
    packed = reference.pack_weight_reference(codes & 7, 3, 32)
    torch.library.opcheck(torch.ops.dfqvit.unpack_weight.default, (packed, 3, 40, 32))


def test_pack_errors_say_what_was_given():
    codes, scale, zero = random_weight(4, 4, 32, GEN)
    with pytest.raises(KernelInputError, match="codes span"):
        pack_weight(codes.to(torch.int32) + 16, scale, zero, 4)
    with pytest.raises(KernelInputError, match="bits=2"):
        pack_weight(codes, scale, zero, 2)
    with pytest.raises(KernelInputError, match="group_k=24"):
        pack_weight(codes, scale, zero, 4, group_k=24)
    with pytest.raises(KernelInputError, match="w_zero spans"):
        pack_weight(codes, scale, zero - 200, 4)
    with pytest.raises(KernelInputError, match="shape"):
        pack_weight(codes, scale[:3], zero, 4)
    with pytest.raises(KernelInputError, match="dtype float32"):
        pack_weight(codes.float(), scale, zero, 4)
    packed = reference.pack_weight_reference(codes, 4, 16)
    with pytest.raises(KernelInputError, match="bytes per row"):
        torch.ops.dfqvit.unpack_weight(packed, 4, 64, 16)
    with pytest.raises(KernelInputError, match="storage_bits=5"):
        torch.ops.dfqvit.pack_weight(codes, 5, 16)


def test_pack_weight_checks_w_zero_before_the_int32_conversion():
    """2**32 + 3 converted to int32 first wrapped to 3 and passed the range check."""
    codes, scale, zero = random_weight(4, 4, 32, GEN)
    with pytest.raises(KernelInputError, match="w_zero spans"):
        pack_weight(codes, scale, zero.to(torch.int64) + 2 ** 32, 4)
    with pytest.raises(KernelInputError, match="w_zero spans"):
        pack_weight(codes, scale, zero.float() + 2 ** 32, 4)


def test_int8_rows_take_zero_points_where_the_kernels_stay_exact():
    """int8 rows accepted any w_zero: 2**24 overflowed the kernels' int32 accumulators (Triton and native then
    disagreed with the reference). [-1920, 1919] keeps W - w_zero exact in fp16 and the row-sum correction in int32;
    a row whose weights all have one sign puts its zero point outside the int8 codes (-187 at W8: refused once)."""
    codes, scale, zero = random_weight(8, 4, 32, GEN)
    for bad in (1920, -1921, 2 ** 24, 2 ** 32 + 3):
        with pytest.raises(KernelInputError, match=r"w_zero spans .*allow \[-1920, 1919\]"):
            pack_weight(codes, scale, torch.full((4,), bad, dtype=torch.int64), 8)
    for bits in (5, 8):
        w = pack_weight(codes, scale, torch.tensor([-1920, 1919, -187, 5]), bits)
        assert w.w_zero.tolist() == [-1920, 1919, -187, 5]


@pytest.mark.parametrize("bits,group_k", [(4, 16), (3, 32)])
def test_reference_unpack_of_no_rows(bits, group_k):
    """N = 0: unpack_int4_reference's reshape(n, -1) raised 'cannot reshape tensor of 0 elements'."""
    packed = torch.empty((0, reference.packed_row_bytes(20, bits, group_k)), dtype=torch.uint8)
    assert reference.unpack_weight_reference(packed, bits, 20, group_k).shape == (0, 20)
    x = torch.randn(3, 20).half()
    y = torch.ops.dfqvit.qgemm_w16(x, packed, torch.empty(0), torch.empty(0, dtype=torch.int32), None, None, bits, 20,
                                   group_k, False, torch.float16)
    assert y.shape == (3, 0)


@requires_triton
def test_int8_rows_with_zero_points_past_int8_stay_exact():
    """At the bounds of the int8-row range the Triton accumulator (row-sum correction) equals the exact sums."""
    from dfqvit.kernels.qgemm import qgemm_accumulator_triton

    codes = torch.randint(-128, 128, (4, 96), dtype=torch.int8, generator=GEN)
    w = pack_weight(codes, torch.ones(4), torch.tensor([-1920, 1919, -187, 0]), 8)
    a = torch.randint(-128, 128, (5, 96), dtype=torch.int8, generator=GEN)
    expected = (a.long() + 7) @ (codes.long() - w.w_zero.long()[:, None]).T
    got = qgemm_accumulator_triton(a.to(TRITON_DEVICE), -7, w.data.to(TRITON_DEVICE), w.w_zero.to(TRITON_DEVICE),
                                   w.w_col_sums.to(TRITON_DEVICE), 8, 96, w.group_k)
    assert torch.equal(got.cpu().long(), expected)
