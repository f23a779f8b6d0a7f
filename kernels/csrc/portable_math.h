// The portable fp32 math of kernels/portable_math.py in C++: the same constants, the same operations in the
// same order, one IEEE rounding each. The build passes -ffp-contract=off so that no multiply-add is fused
// into an FMA (that would round once instead of twice and change bits).
//
// Scalar versions compile everywhere; the AVX2 versions (8 lanes, same operations) are for code compiled
// with __attribute__((target("avx2"))). Every function agrees with its Python twin bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// DFQVIT_NO_X86 builds the portable code alone on an x86-64 host too (scalar kernels only): how the tests check the
// code paths of other CPUs (tests/test_native_portability.py).
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(DFQVIT_NO_X86)
#include <immintrin.h>
#define DFQVIT_X86 1
// A plain loop compiled twice, for AVX2 and the x86-64 baseline, the copy chosen when the library loads.
#define DFQVIT_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DFQVIT_AVX2_CLONES
#endif

namespace dfqvit {
namespace pm {

// Eigen's generic_fast_erf_float (numerator odd, denominator even in x).
constexpr float kErfNum[7] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                              -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                              -1.60960333262415e-02f};
constexpr float kErfDen[5] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                              -7.37332916720468e-03f, -1.42647390514189e-02f};
constexpr float kSqrt1_2 = 0.7071067811865476f;
// ln(2)^i / i!, i = 7 .. 0, rounded to fp32 exactly as torch rounds the Python doubles.
constexpr float kExp2Poly[8] = {1.5252733646775596e-05f, 1.540352968731895e-04f, 1.3333557872101665e-03f,
                                9.618128649890423e-03f,  5.550410971045494e-02f, 2.4022650718688965e-01f,
                                6.931471824645996e-01f,  1.0f};
constexpr float kSumScale = 9007199254740992.0f;      // 2**53
constexpr float kSumInvScale = 1.1102230246251565e-16f;  // 2**-53
constexpr double kInvSqrt2F64 = 0.7071067811865476;
constexpr int64_t kLog2Zero = int64_t(1) << 30;  // round_neg_log2(0): beyond every level

inline float erf(float x) {
  x = std::fmin(std::fmax(x, -4.0f), 4.0f);
  const float x2 = x * x;
  float p = kErfNum[0];
  for (int i = 1; i < 7; ++i) { p = p * x2; p = p + kErfNum[i]; }
  float q = kErfDen[0];
  for (int i = 1; i < 5; ++i) { q = q * x2; q = q + kErfDen[i]; }
  return (x * p) / q;
}

inline float gelu(float y) { return y * 0.5f * (1.0f + erf(y * kSqrt1_2)); }

inline float bits_to_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 2**d for d <= 0; 0 below 2**-126.
inline float exp2(float d) {
  const float n = std::nearbyint(d);  // round half to even (default rounding mode), like torch.round
  const float f = d - n;
  float p = kExp2Poly[0];
  for (int i = 1; i < 8; ++i) { p = p * f; p = p + kExp2Poly[i]; }
  const int32_t n_int = static_cast<int32_t>(std::fmax(n, -126.0f));
  const float e = p * bits_to_float((n_int + 127) << 23);
  return d < -126.0f ? 0.0f : e;
}

// round(-log2(ratio)) exactly (frexp: no libm log2); kLog2Zero for ratio <= 0.
inline int64_t round_neg_log2(float ratio) {
  if (!(ratio > 0.0f)) return kLog2Zero;
  int exp;
  const float mant = std::frexp(ratio, &exp);
  return (static_cast<double>(mant) < kInvSqrt2F64 ? 1 : 0) - static_cast<int64_t>(exp);
}

inline int64_t fixed_point_term(float e) { return static_cast<int64_t>(e * kSumScale); }
inline float fixed_point_sum_to_float(int64_t sum) { return static_cast<float>(sum) * kSumInvScale; }

#if DFQVIT_X86
// fp32 vector operations at two widths: 8 lanes (AVX2) and 16 (AVX-512). Code written once against them
// (gelu_inplace.inc here, the GEMM epilogue in qgemm_cpu.cpp) is compiled once per width with that width's target;
// the same operations per lane give the same bits at both widths.
struct F32x8 {
  using F = __m256;
  static constexpr int kLanes = 8;
#define DFQVIT_F8 __attribute__((target("avx2"))) static inline
  DFQVIT_F8 F set1(float x) { return _mm256_set1_ps(x); }
  DFQVIT_F8 F load(const float* p) { return _mm256_loadu_ps(p); }
  DFQVIT_F8 void store(float* p, F y) { _mm256_storeu_ps(p, y); }
  DFQVIT_F8 F add(F a, F b) { return _mm256_add_ps(a, b); }
  DFQVIT_F8 F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  DFQVIT_F8 F div(F a, F b) { return _mm256_div_ps(a, b); }
  DFQVIT_F8 F min(F a, F b) { return _mm256_min_ps(a, b); }
  DFQVIT_F8 F max(F a, F b) { return _mm256_max_ps(a, b); }
#undef DFQVIT_F8
};

struct F32x16 {
  using F = __m512;
  static constexpr int kLanes = 16;
#define DFQVIT_F16 __attribute__((target("avx512f"))) static inline
  DFQVIT_F16 F set1(float x) { return _mm512_set1_ps(x); }
  DFQVIT_F16 F load(const float* p) { return _mm512_loadu_ps(p); }
  DFQVIT_F16 void store(float* p, F y) { _mm512_storeu_ps(p, y); }
  DFQVIT_F16 F add(F a, F b) { return _mm512_add_ps(a, b); }
  DFQVIT_F16 F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  DFQVIT_F16 F div(F a, F b) { return _mm512_div_ps(a, b); }
  DFQVIT_F16 F min(F a, F b) { return _mm512_min_ps(a, b); }
  DFQVIT_F16 F max(F a, F b) { return _mm512_max_ps(a, b); }
#undef DFQVIT_F16
};

constexpr int64_t kGeluChunk = 768;

// gelu8::gelu_inplace (AVX2) and gelu16::gelu_inplace (AVX-512 CPUs: the VNNI and AMX rungs; once the GEMM ran on
// AMX, GELU was the largest part of the fc1 GEMM), from one body.
namespace gelu8 {
using L = F32x8;
#define DFQVIT_GELU_TARGET __attribute__((target("avx2")))
#include "gelu_inplace.inc"
#undef DFQVIT_GELU_TARGET
}  // namespace gelu8

namespace gelu16 {
using L = F32x16;
#define DFQVIT_GELU_TARGET __attribute__((target("avx2,avx512f")))
#include "gelu_inplace.inc"
#undef DFQVIT_GELU_TARGET
}  // namespace gelu16

__attribute__((target("avx2"))) inline __m256 exp2_avx2(__m256 d) {
  const __m256 n = _mm256_round_ps(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(d, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(kExp2Poly[i]));
  const __m256i n_int = _mm256_cvtps_epi32(_mm256_max_ps(n, _mm256_set1_ps(-126.0f)));  // integral: exact
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n_int, _mm256_set1_epi32(127)), 23));
  const __m256 e = _mm256_mul_ps(p, two_n);
  const __m256 underflow = _mm256_cmp_ps(d, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
  return _mm256_andnot_ps(underflow, e);
}

// exp2_avx2 on 16 lanes (AVX-512 CPUs): the same operations per lane, so the same bits.
__attribute__((target("avx512f"))) inline __m512 exp2_avx512(__m512 d) {
  const __m512 n = _mm512_roundscale_ps(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(d, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(kExp2Poly[i]));
  const __m512i n_int = _mm512_cvtps_epi32(_mm512_max_ps(n, _mm512_set1_ps(-126.0f)));  // integral: exact
  const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n_int, _mm512_set1_epi32(127)), 23));
  const __m512 e = _mm512_mul_ps(p, two_n);
  const __mmask16 underflow = _mm512_cmp_ps_mask(d, _mm512_set1_ps(-126.0f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), e);
}
#endif

}  // namespace pm
}  // namespace dfqvit
