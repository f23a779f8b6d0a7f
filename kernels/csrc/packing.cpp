// dfqvit._C: the int4 / int3 weight packers of kernels/packing.py in C++, for the CPU backend.
//
// Byte-for-byte the layouts documented in dfqvit.kernels.packing.PackedLayout (tests/test_kernels_native.py
// compares them with the PyTorch reference). Registered as torch ops in the "dfqvit" namespace:
//   torch.ops.dfqvit.native_pack_weight(Tensor codes, int storage_bits, int group_k) -> Tensor
//   torch.ops.dfqvit.native_unpack_weight(Tensor packed, int storage_bits, int k, int group_k) -> Tensor
// Importing the Python module dfqvit._C (module.cpp) loads this library, which registers the ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "packing.h"

namespace dfqvit {
namespace {

void check_args(int64_t storage_bits, int64_t group_k) {
  TORCH_CHECK(storage_bits == 3 || storage_bits == 4, "dfqvit native packing: storage_bits=", storage_bits,
              "; allowed: 3, 4.");
  TORCH_CHECK(group_k >= 16 && (group_k & (group_k - 1)) == 0, "dfqvit native packing: group_k=", group_k,
              "; allowed: a power of two >= 16.");
}

at::Tensor pack_weight(const at::Tensor& codes_in, int64_t storage_bits, int64_t group_k) {
  check_args(storage_bits, group_k);
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kByte,
              "dfqvit native packing: codes must be a 2-D uint8 tensor, got ", codes_in.sizes(), " ",
              codes_in.scalar_type(), ".");
  const at::Tensor codes = codes_in.contiguous();
  const int64_t n = codes.size(0), k = codes.size(1), kp = padded_k(k, group_k);
  const int64_t row_bytes = kp * storage_bits / 8;
  at::Tensor packed = at::zeros({n, row_bytes}, codes.options());
  const uint8_t* src = codes.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  auto code_at = [&](int64_t row, int64_t pos) -> uint8_t { return pos < k ? src[row * k + pos] : 0; };
  for (int64_t row = 0; row < n; ++row) {
    uint8_t* out = dst + row * row_bytes;
    for (int64_t g = 0; g < kp / group_k; ++g) {
      const int64_t base = g * group_k;
      if (storage_bits == 4) {
        // byte j: position j in the low nibble, j + G/2 in the high nibble
        for (int64_t j = 0; j < group_k / 2; ++j) {
          out[g * group_k / 2 + j] =
              static_cast<uint8_t>((code_at(row, base + j) & 0xF) |
                                   ((code_at(row, base + group_k / 2 + j) & 0xF) << 4));
        }
      } else {
        uint8_t* grp = out + g * (3 * group_k / 8);
        // 2-bit plane: byte r holds the low bits of positions r + f*G/4 at bits 2f..2f+1
        for (int64_t r = 0; r < group_k / 4; ++r) {
          uint8_t byte = 0;
          for (int f = 0; f < 4; ++f) byte |= (code_at(row, base + f * group_k / 4 + r) & 0x3) << (2 * f);
          grp[r] = byte;
        }
        // 1-bit plane: byte r holds bit 2 of positions r + i*G/8 at bit i
        for (int64_t r = 0; r < group_k / 8; ++r) {
          uint8_t byte = 0;
          for (int i = 0; i < 8; ++i) byte |= ((code_at(row, base + i * group_k / 8 + r) >> 2) & 0x1) << i;
          grp[group_k / 4 + r] = byte;
        }
      }
    }
  }
  return packed;
}

at::Tensor unpack_weight(const at::Tensor& packed_in, int64_t storage_bits, int64_t k, int64_t group_k) {
  check_args(storage_bits, group_k);
  const int64_t kp = padded_k(k, group_k), row_bytes = kp * storage_bits / 8;
  TORCH_CHECK(packed_in.dim() == 2 && packed_in.scalar_type() == at::kByte && packed_in.size(1) == row_bytes,
              "dfqvit native unpacking: packed must be uint8 (N, ", row_bytes, ") for k=", k, ", got ",
              packed_in.sizes(), " ", packed_in.scalar_type(), ".");
  const at::Tensor packed = packed_in.contiguous();
  const int64_t n = packed.size(0);
  at::Tensor codes = at::empty({n, k}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  for (int64_t row = 0; row < n; ++row) unpack_row(src + row * row_bytes, storage_bits, k, group_k, dst + row * k);
  return codes;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dfqvit, m) {
  m.def("native_pack_weight(Tensor codes, int storage_bits, int group_k) -> Tensor");
  m.def("native_unpack_weight(Tensor packed, int storage_bits, int k, int group_k) -> Tensor");
}

TORCH_LIBRARY_IMPL(dfqvit, CPU, m) {
  m.impl("native_pack_weight", &pack_weight);
  m.impl("native_unpack_weight", &unpack_weight);
}

}  // namespace dfqvit
