// LayerNorm + quantize of whole rows, bit for bit kernels/reference.py:layernorm_quant_reference (the fp32
// operations of the reference in the same order):
//   mean = fp32(sum_j x_j in float64, index order) / C      (reference: portable_math.sequential_sum)
//   var  = fp32(sum_j (x_j - mean)^2 in float64, index order) / C
//   y    = (x - mean) * (1 / sqrt(var + eps)) * weight + bias
//   q    = clamp(round(y / scale) + zero, qmin, qmax) as int8         (reference.uniform_quantize)
// Used by native_layernorm_quant (act_quant_cpu.cpp) and by the GEMM whose fp32 rows feed a LayerNorm
// (qgemm_cpu.cpp: the rows of a finished output tile, while they are in cache).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_isa.h"
#include "portable_math.h"
#include "quantize.h"

namespace dfqvit {
namespace layernorm_detail {

#if DFQVIT_X86
// y[j] = ((x[j] - mean) * rstd) * w[j] + b[j] for j < n rounded down to 8.
__attribute__((target("avx2"))) inline int64_t normalize_avx2(const float* x, int64_t n, float mean, float rstd,
                                                              const float* w, const float* b, float* y) {
  const __m256 vm = _mm256_set1_ps(mean), vr = _mm256_set1_ps(rstd);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(x + j), vm);
    _mm256_storeu_ps(y + j, _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(c, vr), _mm256_loadu_ps(w + j)),
                                          _mm256_loadu_ps(b + j)));
  }
  return j;
}

// acc[g] += term(g, column) for every column of rows 4g .. 4g + 3 (row r at x + r * c), in index order, one
// float64 lane per row; 4 x 4 blocks are transposed to get one column (4 rows' j-th values) per add.
template <int G, typename Term>
__attribute__((target("avx2"))) inline void add_columns_avx2(const float* x, int64_t c, const Term& term,
                                                             __m256d* acc) {
  int64_t j = 0;
  for (; j + 4 <= c; j += 4)
    for (int g = 0; g < G; ++g) {
      const float* r = x + 4 * g * c + j;
      __m128 a = _mm_loadu_ps(r), b = _mm_loadu_ps(r + c), e = _mm_loadu_ps(r + 2 * c), f = _mm_loadu_ps(r + 3 * c);
      _MM_TRANSPOSE4_PS(a, b, e, f);
      for (__m128 col : {a, b, e, f}) acc[g] = _mm256_add_pd(acc[g], _mm256_cvtps_pd(term(g, col)));
    }
  for (; j < c; ++j)
    for (int g = 0; g < G; ++g) {
      const float* r = x + 4 * g * c + j;
      acc[g] = _mm256_add_pd(acc[g], _mm256_cvtps_pd(term(g, _mm_setr_ps(r[0], r[c], r[2 * c], r[3 * c]))));
    }
}

// mean and rstd of 4 * G rows at once with the reference's sums: each lane of a float64 vector adds its row's
// values in index order, so the rows are independent dependency chains (one row alone waits on the latency of
// every add; G = 2 keeps two vectors of chains in flight).
template <int G>
__attribute__((target("avx2"))) inline void row_moments_avx2(const float* x, int64_t c, float cf, float epsf,
                                                             float* mean, float* rstd) {
  __m256d acc[G];
  __m128 vmean[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_pd();
  add_columns_avx2<G>(x, c, [](int, __m128 col) { return col; }, acc);
  for (int g = 0; g < G; ++g) {
    vmean[g] = _mm_div_ps(_mm256_cvtpd_ps(acc[g]), _mm_set1_ps(cf));
    acc[g] = _mm256_setzero_pd();
  }
  const auto squared_deviation = [&vmean](int g, __m128 col) {
    const __m128 centered = _mm_sub_ps(col, vmean[g]);
    return _mm_mul_ps(centered, centered);
  };
  add_columns_avx2<G>(x, c, squared_deviation, acc);
  for (int g = 0; g < G; ++g) {
    const __m128 var = _mm_div_ps(_mm256_cvtpd_ps(acc[g]), _mm_set1_ps(cf));
    _mm_storeu_ps(mean + 4 * g, vmean[g]);
    _mm_storeu_ps(rstd + 4 * g, _mm_div_ps(_mm_set1_ps(1.0f), _mm_sqrt_ps(_mm_add_ps(var, _mm_set1_ps(epsf)))));
  }
}
#endif

// mean and rstd of one row, sums in float64 in index order (the reference's portable_math.sequential_sum).
inline void row_moments(const float* xr, int64_t c, float cf, float epsf, float* mean, float* rstd) {
  double acc = 0.0;
  for (int64_t j = 0; j < c; ++j) acc += static_cast<double>(xr[j]);
  *mean = static_cast<float>(acc) / cf;
  double acc2 = 0.0;
  for (int64_t j = 0; j < c; ++j) {
    const float centered = xr[j] - *mean;
    acc2 += static_cast<double>(centered * centered);
  }
  const float var = static_cast<float>(acc2) / cf;
  *rstd = 1.0f / std::sqrt(var + epsf);
}

}  // namespace layernorm_detail

// The parameters of one LayerNorm + quantize.
struct LayerNormQuant {
  const float* weight;  // (C)
  const float* bias;    // (C)
  float eps;
  Grid grid;
};

// Rows [0, rows) of x (row stride c) -> int8 codes (row stride c). y: c floats of scratch.
inline void layernorm_quant_rows(const LayerNormQuant& ln, const float* x, int64_t rows, int64_t c, int8_t* out,
                                 float* y, Isa isa) {
  using namespace layernorm_detail;
  const float cf = static_cast<float>(c);
  float mean[8], rstd[8];
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const int block = static_cast<int>(std::min<int64_t>(8, rows - r0));
    int done = 0;
    // The next block's rows: in the engine x is the previous GEMM's output, mostly out of cache (cold calls
    // 0.81 -> 0.75 and 0.86 -> 0.76 ms median at B 64 x 65 x 192 in A/B runs).
    const int64_t next = std::min<int64_t>(rows, r0 + 16);
    for (int64_t off = (r0 + 8) * c; off < next * c; off += 16) __builtin_prefetch(x + off);
#if DFQVIT_X86
    if (isa != Isa::kScalar && block == 8) {
      row_moments_avx2<2>(x + r0 * c, c, cf, ln.eps, mean, rstd);
      done = 8;
    } else if (isa != Isa::kScalar && block >= 4) {
      row_moments_avx2<1>(x + r0 * c, c, cf, ln.eps, mean, rstd);
      done = 4;
    }
#endif
    for (int r = done; r < block; ++r) row_moments(x + (r0 + r) * c, c, cf, ln.eps, mean + r, rstd + r);
    for (int r = 0; r < block; ++r) {
      const float* xr = x + (r0 + r) * c;
      int64_t j = 0;
#if DFQVIT_X86
      if (isa != Isa::kScalar) j = normalize_avx2(xr, c, mean[r], rstd[r], ln.weight, ln.bias, y);
#endif
      for (; j < c; ++j) y[j] = (xr[j] - mean[r]) * rstd[r] * ln.weight[j] + ln.bias[j];
      quantize_row(y, c, ln.grid, out + (r0 + r) * c, isa);
    }
  }
}

}  // namespace dfqvit
