// The packed weight layouts of kernels/packing.py (PackedLayout), decoded in C++: shared by the native
// unpacker (packing.cpp) and the GEMM's CPU-panel prepacking (qgemm_cpu.cpp).
#pragma once

#include <cstdint>

namespace dfqvit {

inline int64_t padded_k(int64_t k, int64_t group_k) { return (k + group_k - 1) / group_k * group_k; }

// Codes of one packed row (storage 3 = int3_bitplanes, 4 = int4_half_split) into out[0..k).
inline void unpack_row(const uint8_t* in, int64_t storage_bits, int64_t k, int64_t group_k, uint8_t* out) {
  for (int64_t pos = 0; pos < k; ++pos) {
    const int64_t g = pos / group_k, p = pos % group_k;
    if (storage_bits == 4) {
      const uint8_t byte = in[g * group_k / 2 + p % (group_k / 2)];
      out[pos] = p < group_k / 2 ? (byte & 0xF) : (byte >> 4);
    } else {
      const uint8_t* grp = in + g * (3 * group_k / 8);
      const uint8_t low = (grp[p % (group_k / 4)] >> (2 * (p / (group_k / 4)))) & 0x3;
      const uint8_t high = (grp[group_k / 4 + p % (group_k / 8)] >> (p / (group_k / 8))) & 0x1;
      out[pos] = static_cast<uint8_t>(low | (high << 2));
    }
  }
}

}  // namespace dfqvit
