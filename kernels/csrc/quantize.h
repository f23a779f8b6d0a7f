// Re-quantization to int8 on a (scale, zero, qmin, qmax) grid, bit for bit reference.uniform_quantize:
// clamp(round_half_even(y / scale) + zero, qmin, qmax). Shared by the LayerNorm+quantize, quantize and
// attention kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "cpu_isa.h"
#include "portable_math.h"  // DFQVIT_X86 and the intrinsics

namespace dfqvit {

struct Grid {
  float scale, zero, qmin, qmax;
};

inline int8_t quantize_scalar(float y, const Grid& g) {
  float q = std::nearbyint(y / g.scale) + g.zero;
  return static_cast<int8_t>(std::fmin(std::fmax(q, g.qmin), g.qmax));
}

#if DFQVIT_X86
// quantize_scalar on 8 lanes (a grid per lane: scale, zero, qmin, qmax), stored as 8 int8 codes at q.
__attribute__((target("avx2"))) inline void quantize8_avx2(__m256 y, __m256 scale, __m256 zero, __m256 qmin,
                                                           __m256 qmax, int8_t* q) {
  __m256 v = _mm256_round_ps(_mm256_div_ps(y, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, zero), qmin), qmax);
  const __m256i vi = _mm256_cvtps_epi32(v);  // integral already: exact
  const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(vi), _mm256_extracti128_si256(vi, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(p16, p16));
}

// q[j] = quantize(y[j]) for j < n rounded down to 8; returns how many were done.
__attribute__((target("avx2"))) inline int64_t quantize_avx2(const float* y, int64_t n, const Grid& g, int8_t* q) {
  const __m256 scale = _mm256_set1_ps(g.scale), zero = _mm256_set1_ps(g.zero);
  const __m256 lo = _mm256_set1_ps(g.qmin), hi = _mm256_set1_ps(g.qmax);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) quantize8_avx2(_mm256_loadu_ps(y + j), scale, zero, lo, hi, q + j);
  return j;
}
#endif

inline void quantize_row(const float* y, int64_t n, const Grid& g, int8_t* q, Isa isa) {
  int64_t j = 0;
#if DFQVIT_X86
  if (isa != Isa::kScalar) j = quantize_avx2(y, n, g, q);
#endif
  for (; j < n; ++j) q[j] = quantize_scalar(y[j], g);
}

inline Grid make_grid(double scale, int64_t zero, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(scale > 0 && qmin <= qmax && qmin >= -128 && qmax <= 127,
              "dfqvit native re-quantization grid: scale=", scale, " must be > 0 and -128 <= qmin=", qmin,
              " <= qmax=", qmax, " <= 127.");
  return Grid{static_cast<float>(scale), static_cast<float>(zero), static_cast<float>(qmin), static_cast<float>(qmax)};
}

}  // namespace dfqvit
