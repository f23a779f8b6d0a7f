// dfqvit::native_attention: int8 Q, K, V -> exact QK^T -> portable base-2 softmax -> log2 (or linear) P codes
// -> exact P.V, on the CPU; bit for bit kernels/reference.py:attention_log2_reference / attention_linear_reference.
//
//   S    = (q - q_zero)(k - k_zero)^T       int16 pairs (vpmaddwd) into int32: exact; |S| < 256 * 255 * 255 < 2**24,
//                                           so fp32(S) is exact too
//   t_j  = S_j * fp32(scale * log2 e) [+ bias * log2 e] [+ mask * log2 e]
//   e_j  = exp2(t_j - max t)                (portable_math.h: polynomial + exponent bits, AVX2 or scalar)
//   p_j  = e_j / fp32(sum_j trunc(e_j 2**53)) 2**-53   (int64 fixed point: any order, same bits)
//   log2:   k_j = round(-log2 max(p_j / delta, floor)) from the fp32 exponent and mantissa bits;
//           W_j = 2**(S - k_j) (0 for the underflow code and for k_j > S = min(2**bits - 1, 32))
//           out = fp32(sum_j W_j (v_j - v_zero)) * 2**-S * fp32(delta * v_scale)
//   linear: c_j = clamp(round(p_j / p_scale) + p_zero, 0, 2**bits - 1);  W_j = c_j - p_zero
//           out = fp32(sum_j W_j (v_j - v_zero)) * fp32(p_scale * v_scale)
// P.V in float64 for both modes: the weights (2**(S - k_j), or c_j - p_zero) and V are integers, every product
// and partial sum an integer below 2**53 for up to kExactKeys keys, so any order of FMAs gives the exact sum
// (longer rows add exact per-chunk sums in int64). For log2 codes the product by 2**(S - k_j) is the shift:
// float64 adds S - k_j to v's exponent. Measured on AVX2 (Zen 3, n 65, d 64, one core): float64 FMAs 13-16
// G terms/s, int64 vpsllq + vpaddq 9-10, per-level int32 buckets combined by shifts (the earlier form) ~4.
// Exact integer P.V where it pays: on the AVX2 rung, weights that fit int16 (3-/4-bit log2 codes, linear codes) in
// int32 through vpmaddwd (exact_pv16_rows); on AMX and AVX-512 VNNI, 3-/4-bit log2 codes as byte planes
// (pv_rows_planes).
// One (batch, head) pair per claim on torch's OpenMP pool (parallel.h); Q, K, V are read once per head (strided
// views are fine) into centred int16 (Q, K) and int32 (V) buffers; the row loops are AVX2 (scalar elsewhere), QK^T
// and the float64 P.V on 512-bit vectors where the CPU has AVX-512 (the VNNI and AMX rungs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "cpu_isa.h"
#include "parallel.h"
#include "portable_math.h"
#include "quantize.h"

namespace dfqvit {
namespace {

constexpr double kLog2E = 1.4426950408889634;
constexpr int64_t kModeLog2 = 0;
// Keys per exact float64 P.V chunk: |weight| <= 2**32 (log2, S <= 32) or 255 (linear), |v - v_zero| <= 255,
// so 8192 terms stay below 2**53.
constexpr int64_t kExactKeys = 8192;
constexpr int64_t kAmxMaxKeys = kExactKeys;  // keys per row at most for the byte-plane P.V (pv_rows_planes)
constexpr int kPvRows = 6;  // query rows per P.V block (float64)
constexpr int kMaxRows = kAmxRows;  // query rows per block at most (AMX: one tile of 16)

#if DFQVIT_X86
// The row helpers below take n8, a multiple of 8 (weights_rows_avx2 pads the keys).
// t[j] = fp32(s[j]) * scale.
__attribute__((target("avx2"))) void scale_scores_avx2(const int32_t* s, float scale, float* t, int64_t n8) {
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256i sj = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j));
    _mm256_storeu_ps(t + j, _mm256_mul_ps(_mm256_cvtepi32_ps(sj), vscale));
  }
}

// max_j t[j] (n8 >= 8).
__attribute__((target("avx2"))) float max8_avx2(const float* t, int64_t n8) {
  __m256 top = _mm256_loadu_ps(t);
  for (int64_t j = 8; j < n8; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(t + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  return *std::max_element(lanes, lanes + 8);
}

// e[j] = exp2(t[j] - top); returns the fixed-point row sum sum_j trunc(e[j] * 2**53) (e in [0, 1]) as
// sum_j hi_j * 2**31 + lo_j with hi = trunc(e * 2**22) and lo = trunc(frac(e * 2**22) * 2**31) < 2**31: both steps
// exact in fp32 (products by powers of two, an integer part and its fraction), and all in 32-bit lanes: hi summed
// as it is, lo in two 16-bit halves, per chunk of kFixedChunk keys (lane sums < 2**30), then in int64. (The
// earlier form widened every term to int64 and shifted it by its exponent: the attention 3% slower.)
constexpr int64_t kFixedChunk = 2048;
__attribute__((target("avx2"))) int64_t exp2_fixed_sum_avx2(const float* t, float top, float* e, int64_t n8) {
  const __m256 vtop = _mm256_set1_ps(top), two22 = _mm256_set1_ps(4194304.0f), two31 = _mm256_set1_ps(2147483648.0f);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  int64_t total = 0;
  for (int64_t j0 = 0; j0 < n8; j0 += kFixedChunk) {
    __m256i hi_sum = _mm256_setzero_si256(), mid_sum = _mm256_setzero_si256(), low_sum = _mm256_setzero_si256();
    for (int64_t j = j0; j < std::min(n8, j0 + kFixedChunk); j += 8) {
      const __m256 ej = pm::exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(t + j), vtop));
      _mm256_storeu_ps(e + j, ej);
      const __m256 v = _mm256_mul_ps(ej, two22);
      const __m256 whole = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __m256i lo = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_sub_ps(v, whole), two31));
      hi_sum = _mm256_add_epi32(hi_sum, _mm256_cvttps_epi32(whole));
      mid_sum = _mm256_add_epi32(mid_sum, _mm256_srli_epi32(lo, 16));
      low_sum = _mm256_add_epi32(low_sum, _mm256_and_si256(lo, low16));
    }
    alignas(32) int32_t hi[8], mid[8], low[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(hi), hi_sum);
    _mm256_store_si256(reinterpret_cast<__m256i*>(mid), mid_sum);
    _mm256_store_si256(reinterpret_cast<__m256i*>(low), low_sum);
    for (int u = 0; u < 8; ++u) total += (int64_t(hi[u]) << 31) + (int64_t(mid[u]) << 16) + low[u];
  }
  return total;
}

// Log2 P.V weights of the probabilities e[j] / sum: k = round(-log2 max(p / delta, floor)) clamped at 0, and
// w = 2**(shift - k) as float64 bits ((1023 + shift - k) << 52), or 0 where the level adds nothing to P.V
// (k > shift, or a ratio below 2**-126, whose k >= 126 > 32 >= shift). With ecode (the AMX P.V), instead of w the
// bytes ecode[j] = 1 + shift - k, or 0 for no weight; with w16 (the int16 P.V, shift <= 15) -2**(shift - k) or 0.
__attribute__((target("avx2"))) void log2_weights_avx2(const float* e, int64_t n8, float sum, float delta,
                                                        float floor, int64_t shift, double* w, uint8_t* ecode,
                                                        int16_t* w16 = nullptr) {
  const __m256 vsum = _mm256_set1_ps(sum), vdelta = _mm256_set1_ps(delta), vfloor = _mm256_set1_ps(floor);
  const __m256 normal = _mm256_set1_ps(1.17549435e-38f);
  const __m256i vshift = _mm256_set1_epi32(static_cast<int32_t>(shift)), zero = _mm256_setzero_si256();
  const __m256i exp_mask = _mm256_set1_epi32(0xFF), mant_mask = _mm256_set1_epi32(0x7FFFFF);
  const __m256i sqrt2_mant = _mm256_set1_epi32(0x3504F3), bias = _mm256_set1_epi32(127);
  const __m256i one_exp = _mm256_set1_epi32(static_cast<int32_t>(1023 + shift));
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 p = _mm256_div_ps(_mm256_loadu_ps(e + j), vsum);
    const __m256 ratio = _mm256_max_ps(_mm256_div_ps(p, vdelta), vfloor);
    const __m256i bits = _mm256_castps_si256(ratio);
    const __m256i exponent = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), exp_mask), bias);
    // k = -E - (mantissa > sqrt 2); mantissa bits above 0x3504F3 <=> m > sqrt(2)
    const __m256i up = _mm256_cmpgt_epi32(_mm256_and_si256(bits, mant_mask), sqrt2_mant);  // -1 or 0
    const __m256i k = _mm256_max_epi32(_mm256_add_epi32(_mm256_sub_epi32(zero, exponent), up), zero);
    const __m256i tiny = _mm256_castps_si256(_mm256_cmp_ps(ratio, normal, _CMP_LT_OQ));
    const __m256i keep = _mm256_andnot_si256(_mm256_or_si256(_mm256_cmpgt_epi32(k, vshift), tiny),
                                             _mm256_set1_epi32(-1));
    const __m256i biased = _mm256_and_si256(_mm256_sub_epi32(one_exp, k), keep);  // 0 bits = +0.0
    if (ecode) {
      const __m256i c = _mm256_max_epi32(_mm256_sub_epi32(biased, _mm256_set1_epi32(1022)), zero);
      const __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(ecode + j), _mm_packus_epi16(c16, c16));
      continue;
    }
    if (w16) {  // shift - k < 0 shifts the 1 out; -2**15 is an int16, and packs keeps it
      const __m256i pow2 = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(1), _mm256_sub_epi32(vshift, k)), keep);
      const __m256i packed = _mm256_packs_epi32(_mm256_sub_epi32(zero, pow2), zero);  // per 128-bit lane
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w16 + j),
                       _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
      continue;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + j),
                        _mm256_slli_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(biased)), 52));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + j + 4),
                        _mm256_slli_epi64(_mm256_cvtepu32_epi64(_mm256_extracti128_si256(biased, 1)), 52));
  }
}

// exp2_fixed_sum_avx2 and log2_weights_avx2 (float64 weights only: AMX's exponent codes keep the AVX2 form, which
// no AMX host has run in 16 lanes yet) on 16 lanes, for AVX-512 CPUs (the VNNI and AMX rungs): the same operations
// per lane (same bits; the row sum is order-free). n8 is a multiple of 8: a last half vector is masked (t read as
// -inf there: e = 0, nothing added; nothing stored). In-process A/B against the AVX2 forms on the 2-core Zen 5 VM:
// the attention 1.02-1.09x (n 49-197; 0.98x at n 17, 19 us a call).
__attribute__((target("avx2,avx512f,avx512bw"))) int64_t exp2_fixed_sum_avx512(const float* t, float top, float* e,
                                                                              int64_t n8) {
  const __m512 vtop = _mm512_set1_ps(top), two22 = _mm512_set1_ps(4194304.0f), two31 = _mm512_set1_ps(2147483648.0f);
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  int64_t total = 0;
  for (int64_t j0 = 0; j0 < n8; j0 += kFixedChunk) {
    __m512i hi_sum = _mm512_setzero_si512(), mid_sum = _mm512_setzero_si512(), low_sum = _mm512_setzero_si512();
    for (int64_t j = j0; j < std::min(n8, j0 + kFixedChunk); j += 16) {
      const __mmask16 lanes = n8 - j >= 16 ? 0xFFFF : 0x00FF;
      const __m512 ej = pm::exp2_avx512(_mm512_sub_ps(_mm512_mask_loadu_ps(minus_inf, lanes, t + j), vtop));
      _mm512_mask_storeu_ps(e + j, lanes, ej);
      const __m512 v = _mm512_mul_ps(ej, two22);
      const __m512 whole = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __m512i lo = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, whole), two31));
      hi_sum = _mm512_add_epi32(hi_sum, _mm512_cvttps_epi32(whole));
      mid_sum = _mm512_add_epi32(mid_sum, _mm512_srli_epi32(lo, 16));
      low_sum = _mm512_add_epi32(low_sum, _mm512_and_si512(lo, low16));
    }
    alignas(64) int32_t hi[16], mid[16], low[16];
    _mm512_store_si512(hi, hi_sum);
    _mm512_store_si512(mid, mid_sum);
    _mm512_store_si512(low, low_sum);
    for (int u = 0; u < 16; ++u) total += (int64_t(hi[u]) << 31) + (int64_t(mid[u]) << 16) + low[u];
  }
  return total;
}

__attribute__((target("avx2,avx512f,avx512bw"))) void log2_weights_avx512(const float* e, int64_t n8, float sum,
                                                                          float delta, float floor, int64_t shift,
                                                                          double* w) {
  const __m512 vsum = _mm512_set1_ps(sum), vdelta = _mm512_set1_ps(delta), vfloor = _mm512_set1_ps(floor);
  const __m512 normal = _mm512_set1_ps(1.17549435e-38f);
  const __m512i vshift = _mm512_set1_epi32(static_cast<int32_t>(shift)), zero = _mm512_setzero_si512();
  const __m512i exp_mask = _mm512_set1_epi32(0xFF), mant_mask = _mm512_set1_epi32(0x7FFFFF);
  const __m512i sqrt2_mant = _mm512_set1_epi32(0x3504F3), bias = _mm512_set1_epi32(127);
  const __m512i one_exp = _mm512_set1_epi32(static_cast<int32_t>(1023 + shift));
  for (int64_t j = 0; j < n8; j += 16) {
    const bool whole_vector = n8 - j >= 16;
    const __m512 p = _mm512_div_ps(_mm512_maskz_loadu_ps(whole_vector ? 0xFFFF : 0x00FF, e + j), vsum);
    const __m512 ratio = _mm512_max_ps(_mm512_div_ps(p, vdelta), vfloor);
    const __m512i bits = _mm512_castps_si512(ratio);
    const __m512i exponent = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 23), exp_mask), bias);
    // k = -E - (mantissa > sqrt 2); mantissa bits above 0x3504F3 <=> m > sqrt(2)
    const __mmask16 up = _mm512_cmpgt_epi32_mask(_mm512_and_si512(bits, mant_mask), sqrt2_mant);
    const __m512i minus_e = _mm512_sub_epi32(zero, exponent);
    const __m512i k = _mm512_max_epi32(_mm512_mask_sub_epi32(minus_e, up, minus_e, _mm512_set1_epi32(1)), zero);
    const __mmask16 drop = _mm512_cmpgt_epi32_mask(k, vshift) | _mm512_cmp_ps_mask(ratio, normal, _CMP_LT_OQ);
    const __m512i biased = _mm512_maskz_sub_epi32(static_cast<__mmask16>(~drop), one_exp, k);  // 0 bits = +0.0
    _mm512_storeu_si512(w + j, _mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(biased)), 52));
    if (whole_vector)
      _mm512_storeu_si512(w + j + 8,
                          _mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(biased, 1)), 52));
  }
}

// scores[j0 + j] = sum_t q[t] * k[j0 + j, t] for j < 8 * B with int16 pairs (kp holds K transposed in pairs,
// kp[(t/2) * ld * 2 + j * 2 + t%2]). B is a template argument so that the B accumulators stay in registers (with
// a run-time count GCC kept them on the stack, a store and reload per pair: ~4x slower).
template <int B>
__attribute__((target("avx2"))) void scores_block_avx2(const int16_t* q, const int16_t* kp, int64_t ld, int64_t j0,
                                                        int64_t pairs, int32_t* out) {
  __m256i acc[B];
  for (int u = 0; u < B; ++u) acc[u] = _mm256_setzero_si256();
  for (int64_t t = 0; t < pairs; ++t) {
    int32_t qq;
    std::memcpy(&qq, q + 2 * t, 4);
    const __m256i qt = _mm256_set1_epi32(qq);
    const int16_t* row = kp + (t * ld + j0) * 2;
    for (int u = 0; u < B; ++u)
      acc[u] = _mm256_add_epi32(
          acc[u], _mm256_madd_epi16(qt, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * u))));
  }
  for (int u = 0; u < B; ++u) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * u), acc[u]);
}

// All n scores of one query row into scores (ld entries: keys padded to 8 are computed too, on zero K). Blocks of
// 8 vectors (64 keys) while more than 12 vectors remain, then the rest in one block of up to 12: n 65 is one
// pass over q of 9 vectors instead of 8 + 1 (each pass broadcasts every q pair again): the attention 2-4% faster
// (A/B, B 64, 3 heads, n 65, d 64).
__attribute__((target("avx2"))) void scores_row_avx2(const int16_t* q, const int16_t* kp, int64_t ld, int64_t n,
                                                     int64_t pairs, int32_t* scores) {
  int64_t j0 = 0;
  for (; (n - j0 + 7) / 8 > 12; j0 += 64) scores_block_avx2<8>(q, kp, ld, j0, pairs, scores + j0);
  switch ((n - j0 + 7) / 8) {
    case 0: break;
    case 1: scores_block_avx2<1>(q, kp, ld, j0, pairs, scores + j0); break;
    case 2: scores_block_avx2<2>(q, kp, ld, j0, pairs, scores + j0); break;
    case 3: scores_block_avx2<3>(q, kp, ld, j0, pairs, scores + j0); break;
    case 4: scores_block_avx2<4>(q, kp, ld, j0, pairs, scores + j0); break;
    case 5: scores_block_avx2<5>(q, kp, ld, j0, pairs, scores + j0); break;
    case 6: scores_block_avx2<6>(q, kp, ld, j0, pairs, scores + j0); break;
    case 7: scores_block_avx2<7>(q, kp, ld, j0, pairs, scores + j0); break;
    case 8: scores_block_avx2<8>(q, kp, ld, j0, pairs, scores + j0); break;
    case 9: scores_block_avx2<9>(q, kp, ld, j0, pairs, scores + j0); break;
    case 10: scores_block_avx2<10>(q, kp, ld, j0, pairs, scores + j0); break;
    case 11: scores_block_avx2<11>(q, kp, ld, j0, pairs, scores + j0); break;
    default: scores_block_avx2<12>(q, kp, ld, j0, pairs, scores + j0); break;
  }
}
// scores_block_avx2 on 512-bit vectors (AVX-512 CPUs: the VNNI and AMX rungs): B vectors of 16 keys, vpdpwssd
// (int16 pairs multiplied and added into int32, exact: |S| < 2**24). The last vector loads and stores only the keys
// in last_mask (a row padded to 8 keys, not 16; masked lanes are not read). In-process A/B against the AVX2 form on
// the 2-core Zen 5 VM: the attention 1.02-1.13x (n 49-197, d 32 and 64).
template <int B>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void scores_block_avx512(const int16_t* q, const int16_t* kp,
                                                                                 int64_t ld, int64_t j0, int64_t pairs,
                                                                                 __mmask16 last_mask, int32_t* out) {
  __m512i acc[B];
  for (int u = 0; u < B; ++u) acc[u] = _mm512_setzero_si512();
  for (int64_t t = 0; t < pairs; ++t) {
    int32_t qq;
    std::memcpy(&qq, q + 2 * t, 4);
    const __m512i qt = _mm512_set1_epi32(qq);
    const int16_t* row = kp + (t * ld + j0) * 2;
    for (int u = 0; u < B - 1; ++u)
      acc[u] = _mm512_dpwssd_epi32(acc[u], qt, _mm512_loadu_si512(row + 32 * u));
    acc[B - 1] = _mm512_dpwssd_epi32(acc[B - 1], qt, _mm512_maskz_loadu_epi32(last_mask, row + 32 * (B - 1)));
  }
  for (int u = 0; u < B - 1; ++u) _mm512_storeu_si512(out + 16 * u, acc[u]);
  _mm512_mask_storeu_epi32(out + 16 * (B - 1), last_mask, acc[B - 1]);
}

// scores_row_avx2 on 512-bit vectors: blocks of 8 vectors (128 keys) while more than 12 remain, then the rest in one.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void scores_row_avx512(const int16_t* q, const int16_t* kp,
                                                                              int64_t ld, int64_t n, int64_t pairs,
                                                                              int32_t* scores) {
  using BlockFn = void (*)(const int16_t*, const int16_t*, int64_t, int64_t, int64_t, __mmask16, int32_t*);
  static constexpr BlockFn block[13] = {nullptr,
                                        &scores_block_avx512<1>, &scores_block_avx512<2>, &scores_block_avx512<3>,
                                        &scores_block_avx512<4>, &scores_block_avx512<5>, &scores_block_avx512<6>,
                                        &scores_block_avx512<7>, &scores_block_avx512<8>, &scores_block_avx512<9>,
                                        &scores_block_avx512<10>, &scores_block_avx512<11>, &scores_block_avx512<12>};
  const int64_t n8 = (n + 7) / 8 * 8;  // the keys computed (ld >= n8)
  int64_t j0 = 0;
  for (; (n8 - j0 + 15) / 16 > 12; j0 += 128) block[8](q, kp, ld, j0, pairs, 0xFFFF, scores + j0);
  const int64_t vectors = (n8 - j0 + 15) / 16;
  if (vectors) block[vectors](q, kp, ld, j0, pairs, (n8 - j0) % 16 ? 0x00FF : 0xFFFF, scores + j0);
}
#endif

// out[r, t] = sum_j w[r * ldw + j] * v[j * d + t] for columns t0 <= t < d, in float64: the scalar form of
// pv_rows, and the AVX2 form's last columns.
void pv_columns_scalar(const double* w, int64_t ldw, int rows, const int32_t* v, int64_t n, int64_t d, int64_t t0,
                       double* out) {
  for (int r = 0; r < rows; ++r)
    for (int64_t t = t0; t < d; ++t) {
      double total = 0.0;
      for (int64_t j = 0; j < n; ++j) total += w[r * ldw + j] * static_cast<double>(v[j * d + t]);
      out[r * d + t] = total;
    }
}

#if DFQVIT_X86
// Four centred V values (int32) as float64.
__attribute__((target("avx2"), always_inline)) inline __m256d load4_pd(const int32_t* v) {
  return _mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
}

// Columns t0.. of pv_rows: 4 at a time, then the scalar form for the last few.
template <int R>
__attribute__((target("avx2,fma"))) void pv_columns4_avx2(const double* w, int64_t ldw, const int32_t* v, int64_t n,
                                                          int64_t d, int64_t t0, double* out) {
  for (; t0 + 4 <= d; t0 += 4) {
    __m256d acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_pd();
    for (int64_t j = 0; j < n; ++j) {
      const __m256d vj = load4_pd(v + j * d + t0);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_pd(_mm256_broadcast_sd(w + r * ldw + j), vj, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_pd(out + r * d + t0, acc[r]);
  }
  pv_columns_scalar(w, ldw, R, v, n, d, t0, out);
}

// out[r, t] = sum_j w[r * ldw + j] * v[j * d + t] for R rows in float64 (integers below 2**53: exact in any
// order, FMAs included). R rows x 8 columns of accumulators share each load of V. 6 x 8 against the earlier
// 3 x 16: the attention 6-11% faster (A/B, n 65, d 64): V is streamed once per 6 query rows instead of per 3;
// 4 x 12, 5 x 8, 8 x 4 and 12 x 4 were slower. V is kept as int32 and converted at the load (vcvtdq2pd): half
// the bytes of float64 (16 KB per head at n 65, d 64, in L1; float64 was 33 KB), the attention ~4% faster. No
// test for zero weights: unpredictable branches cost more than the FMAs.
template <int R>
__attribute__((target("avx2,fma"))) void pv_rows_avx2(const double* w, int64_t ldw, const int32_t* v, int64_t n,
                                                      int64_t d, double* out) {
  int64_t t0 = 0;
  for (; t0 + 8 <= d; t0 += 8) {
    __m256d acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_pd();
    for (int64_t j = 0; j < n; ++j) {
      const __m256d v0 = load4_pd(v + j * d + t0), v1 = load4_pd(v + j * d + t0 + 4);
      for (int r = 0; r < R; ++r) {
        const __m256d wj = _mm256_broadcast_sd(w + r * ldw + j);
        acc[r][0] = _mm256_fmadd_pd(wj, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_pd(wj, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_pd(out + r * d + t0, acc[r][0]);
      _mm256_storeu_pd(out + r * d + t0 + 4, acc[r][1]);
    }
  }
  pv_columns4_avx2<R>(w, ldw, v, n, d, t0, out);
}

// pv_rows_avx2 on 512-bit vectors (AVX-512 CPUs: the VNNI and AMX rungs): R rows x C vectors of 8 float64
// columns share each load of V (8 int32 converted per vcvtdq2pd). Returns the first column not done. In-process
// A/B against pv_rows_avx2 on the 2-core Zen 5 VM: the attention 1.09-1.22x (n 49-197, d 32 and 64, log2 and
// linear codes); C = 3 or 4 vectors per pass were no faster than 2.
template <int R, int C>
__attribute__((target("avx2,fma,avx512f"))) int64_t pv_block_avx512(const double* w, int64_t ldw, const int32_t* v,
                                                                      int64_t n, int64_t d, int64_t t0, double* out) {
  for (; t0 + 8 * C <= d; t0 += 8 * C) {
    __m512d acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_pd();
    for (int64_t j = 0; j < n; ++j) {
      __m512d vj[C];
      for (int c = 0; c < C; ++c)
        vj[c] = _mm512_cvtepi32_pd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j * d + t0 + 8 * c)));
      for (int r = 0; r < R; ++r) {
        const __m512d wj = _mm512_set1_pd(w[r * ldw + j]);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_pd(wj, vj[c], acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) _mm512_storeu_pd(out + r * d + t0 + 8 * c, acc[r][c]);
  }
  return t0;
}

template <int R>
__attribute__((target("avx2,fma,avx512f"))) void pv_rows_avx512(const double* w, int64_t ldw, const int32_t* v,
                                                                 int64_t n, int64_t d, double* out) {
  const int64_t t0 = pv_block_avx512<R, 1>(w, ldw, v, n, d, pv_block_avx512<R, 2>(w, ldw, v, n, d, 0, out), out);
  pv_columns4_avx2<R>(w, ldw, v, n, d, t0, out);
}
#endif

void scores_row(const int16_t* q, const int16_t* kp, int64_t ld, int64_t n, int64_t pairs, int32_t* scores, Isa isa) {
#if DFQVIT_X86
  if (has_avx512(isa)) return scores_row_avx512(q, kp, ld, n, pairs, scores);
  if (isa != Isa::kScalar) return scores_row_avx2(q, kp, ld, n, pairs, scores);
#endif
  for (int64_t j = 0; j < n; ++j) {
    int32_t total = 0;
    for (int64_t t = 0; t < 2 * pairs; ++t) total += int32_t(q[t]) * int32_t(kp[((t / 2) * ld + j) * 2 + t % 2]);
    scores[j] = total;
  }
}

#if DFQVIT_X86
// f(std::integral_constant<int, R>{}) with R = rows (1 <= rows <= kPvRows): the P.V kernels take their row count
// as a template argument, and the last block of a head has fewer rows.
template <class F>
void with_pv_rows(int rows, F&& f) {
  static_assert(kPvRows == 6, "one case per row count");
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, kPvRows>{});
  }
}

// pv_rows for R rows on the widest vectors the ISA has.
template <int R>
void pv_rows_vector(const double* w, int64_t ldw, const int32_t* v, int64_t n, int64_t d, double* out, Isa isa) {
  if (has_avx512(isa)) return pv_rows_avx512<R>(w, ldw, v, n, d, out);
  pv_rows_avx2<R>(w, ldw, v, n, d, out);
}
#endif

// out[r, t] = sum_j w[r * ldw + j] * v[j * d + t] for rows <= kPvRows rows, in float64.
void pv_rows(const double* w, int64_t ldw, int rows, const int32_t* v, int64_t n, int64_t d, double* out, Isa isa) {
#if DFQVIT_X86
  if (isa != Isa::kScalar)
    return with_pv_rows(rows, [&](auto r) { pv_rows_vector<decltype(r)::value>(w, ldw, v, n, d, out, isa); });
#endif
  pv_columns_scalar(w, ldw, rows, v, n, d, 0, out);
}

#if DFQVIT_X86
// out[x] = (fp32(sums[x]) * a) * b for x < n8 = n / 8 * 8 (cvtpd2ps rounds to nearest, as static_cast).
__attribute__((target("avx2"))) int64_t scaled_floats_avx2(const double* sums, int64_t n, float a, float b,
                                                            float* out) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  int64_t x = 0;
  for (; x + 8 <= n; x += 8) {
    const __m256 f = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(sums + x + 4)),
                                     _mm256_cvtpd_ps(_mm256_loadu_pd(sums + x)));
    _mm256_storeu_ps(out + x, _mm256_mul_ps(_mm256_mul_ps(f, va), vb));
  }
  return x;
}
#endif

// result[r, t] = (fp32(sum_j w[r * ldw + j] * v[j * d + t]) * a) * b: the exact integer rounded once to fp32, then
// the two fp32 scale factors. float64 per chunk of kExactKeys keys, chunks added in int64. partial: rows x d
// doubles, totals: rows x d int64 (scratch).
void exact_pv_rows(const double* w, int64_t ldw, int rows, const int32_t* v, int64_t n, int64_t d, float a, float b,
                   double* partial, int64_t* totals, float* result, Isa isa) {
  const int64_t size = rows * d;
  if (n <= kExactKeys) {
    pv_rows(w, ldw, rows, v, n, d, partial, isa);
    int64_t x = 0;
#if DFQVIT_X86
    if (isa != Isa::kScalar) x = scaled_floats_avx2(partial, size, a, b, result);
#endif
    for (; x < size; ++x) result[x] = (static_cast<float>(partial[x]) * a) * b;
    return;
  }
  std::fill(totals, totals + size, int64_t(0));
  for (int64_t j0 = 0; j0 < n; j0 += kExactKeys) {
    pv_rows(w + j0, ldw, rows, v + j0 * d, std::min(kExactKeys, n - j0), d, partial, isa);
    for (int64_t x = 0; x < size; ++x) totals[x] += static_cast<int64_t>(partial[x]);
  }
  for (int64_t x = 0; x < size; ++x) result[x] = (static_cast<float>(totals[x]) * a) * b;
}

// Keys per exact int32 chunk of the int16 P.V (below) for weights up to max_weight and centred V up to v_span in
// magnitude: a multiple of 8, or 0 where V or the weights do not fit int16 (or not even 8 keys fit).
int64_t pv16_chunk_keys(int64_t max_weight, int64_t v_span) {
  if (max_weight > 32768 || v_span > 32767) return 0;
  return std::numeric_limits<int32_t>::max() / std::max<int64_t>(max_weight * v_span, 1) / 8 * 8;
}

#if DFQVIT_X86
// ---------------------------------------------------------------------------------------------------
// Int16 P.V (the AVX2 rung): 3- and 4-bit log2 codes, and linear codes
// ---------------------------------------------------------------------------------------------------
// Where every weight fits int16 (log2 with S <= 15: W = 2**(S - k) <= 2**15, stored negated since -2**15 is an
// int16; linear codes: W = code - p_zero), P.V runs on vpmaddwd: one row's weights of keys 2i and 2i + 1 (one
// broadcast int32) times both keys' centred V (int16 pairs, 8 columns per vector), added into int32: 16 products
// per multiply-add, against 4 per float64 FMA. The sums are exact while they stay in int32 (pv16_chunk_keys); longer
// rows add exact chunk sums in int64. The negated sum is rounded once to fp32, as on the float64 path: same bits.

// vp[(j / 2) * 2 * d + 2 * t + j % 2] = vd[j * d + t] for keys j < n (the pairs of keys past n stay as they are:
// zero). Two keys' rows of 8 columns at a time: interleaved as int32, then narrowed in that order (packs).
__attribute__((target("avx2"))) void pack_v_pairs(const int32_t* vd, int64_t n, int64_t d, int16_t* vp) {
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const int32_t *v0 = vd + j * d, *v1 = v0 + d;
    int16_t* out = vp + j * d;
    int64_t t = 0;
    for (; t + 8 <= d; t += 8) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + t));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + t));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * t),
                          _mm256_packs_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b)));
    }
    for (; t < d; ++t) {
      out[2 * t] = static_cast<int16_t>(v0[t]);
      out[2 * t + 1] = static_cast<int16_t>(v1[t]);
    }
  }
  for (int64_t t = 0; j < n && t < d; ++t) vp[j * d + 2 * t] = static_cast<int16_t>(vd[j * d + t]);  // odd n
}

// out[r, t] = sum_j w[r * ldw + j] * v[j, t] over `pairs` pairs of keys, for R rows and columns t0 <= t < d.
void pv16_columns_scalar(const int16_t* w, int64_t ldw, int rows, const int16_t* vp, int64_t pairs, int64_t d,
                         int64_t t0, int32_t* out) {
  for (int r = 0; r < rows; ++r)
    for (int64_t t = t0; t < d; ++t) {
      int32_t total = 0;
      for (int64_t i = 0; i < 2 * pairs; ++i)
        total += int32_t(w[r * ldw + i]) * int32_t(vp[(i / 2) * 2 * d + 2 * t + i % 2]);
      out[r * d + t] = total;
    }
}

// The R x C block of int32 sums for columns t0.. (C vectors of 8): each V load serves R rows, as pv_rows_avx2's.
template <int R, int C>
__attribute__((target("avx2"))) int64_t pv16_block_avx2(const int16_t* w, int64_t ldw, const int16_t* vp,
                                                         int64_t pairs, int64_t d, int64_t t0, int32_t* out) {
  for (; t0 + 8 * C <= d; t0 += 8 * C) {
    __m256i acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
    for (int64_t i = 0; i < pairs; ++i) {
      __m256i v[C];
      for (int c = 0; c < C; ++c)
        v[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp + i * 2 * d + 2 * (t0 + 8 * c)));
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, w + r * ldw + 2 * i, sizeof pair);
        const __m256i wr = _mm256_set1_epi32(pair);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(wr, v[c]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * d + t0 + 8 * c), acc[r][c]);
  }
  return t0;
}

template <int R>
void pv16_rows_avx2(const int16_t* w, int64_t ldw, const int16_t* vp, int64_t pairs, int64_t d, int32_t* out) {
  const int64_t t0 = pv16_block_avx2<R, 1>(w, ldw, vp, pairs, d, pv16_block_avx2<R, 2>(w, ldw, vp, pairs, d, 0, out),
                                           out);
  pv16_columns_scalar(w, ldw, R, vp, pairs, d, t0, out);
}

// result[r, t] = (fp32(-sum_j w16[r * ldw + j] * v[j, t]) * a) * b: exact_pv_rows with negated int16 weights and
// V as int16 pairs (vp). sums: rows x d int32, totals: rows x d int64 (scratch).
__attribute__((target("avx2"))) void exact_pv16_rows(const int16_t* w16, int64_t ldw, int rows, const int16_t* vp,
                                                      int64_t n, int64_t d, int64_t chunk_keys, float a, float b,
                                                      int32_t* sums, int64_t* totals, float* result) {
  const int64_t size = rows * d;
  const auto pv16 = [&](int64_t j0, int64_t keys) {
    const int16_t* w = w16 + j0;
    const int16_t* v = vp + j0 * d;
    const int64_t pairs = (keys + 1) / 2;
    with_pv_rows(rows, [&](auto r) { pv16_rows_avx2<decltype(r)::value>(w, ldw, v, pairs, d, sums); });
  };
  if (n <= chunk_keys) {
    pv16(0, n);
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    int64_t x = 0;
    for (; x + 8 <= size; x += 8) {
      const __m256i neg = _mm256_sub_epi32(_mm256_setzero_si256(),
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + x)));
      _mm256_storeu_ps(result + x, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(neg), va), vb));
    }
    for (; x < size; ++x) result[x] = (static_cast<float>(-sums[x]) * a) * b;
    return;
  }
  std::fill(totals, totals + size, int64_t(0));
  for (int64_t j0 = 0; j0 < n; j0 += chunk_keys) {
    pv16(j0, std::min(chunk_keys, n - j0));
    for (int64_t x = 0; x < size; ++x) totals[x] -= sums[x];
  }
  for (int64_t x = 0; x < size; ++x) result[x] = (static_cast<float>(totals[x]) * a) * b;
}
#endif

// One (batch, head) into the row buffers: Q rows centred in int16 (q16 + i * 2 * pairs), V rows centred in
// int32 (vd + i * d; skipped when vd is null: the AMX P.V reads V itself, pack_v_amx), K transposed into int16
// pairs (kpairs[(x / 2) * ld * 2 + i * 2 + x % 2]). Strides in elements; padding entries are left as they are (zero).
struct HeadView {
  const int8_t *q, *k, *v;
  int64_t q_row, q_col, k_row, k_col, v_row, v_col;  // strides between tokens and along d
  int32_t q_zero, k_zero, v_zero;
};

void load_head_scalar(const HeadView& h, int64_t n, int64_t d, int64_t pairs, int64_t ld, int16_t* q16,
                      int16_t* kpairs, int32_t* vd) {
  for (int64_t i = 0; i < n; ++i) {
    const int8_t *qi = h.q + i * h.q_row, *vi = h.v + i * h.v_row, *ki = h.k + i * h.k_row;
    for (int64_t x = 0; x < d; ++x) q16[i * 2 * pairs + x] = static_cast<int16_t>(qi[x * h.q_col] - h.q_zero);
    if (vd)
      for (int64_t x = 0; x < d; ++x) vd[i * d + x] = vi[x * h.v_col] - h.v_zero;
    for (int64_t x = 0; x < d; ++x)
      kpairs[(x / 2) * ld * 2 + i * 2 + x % 2] = static_cast<int16_t>(ki[x * h.k_col] - h.k_zero);
  }
}

#if DFQVIT_X86
// r[u] holds pairs 0..7 of key u; afterwards r[u] holds pair u of keys 0..7 (an 8 x 8 transpose of 32-bit lanes).
__attribute__((target("avx2"))) inline void transpose8x8_epi32(__m256i* r) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// load_head_scalar for unit stride along d (what the engine passes): 16 values of Q, 8 of V per step; K in
// blocks of 8 keys x 16 values through one 8 x 8 transpose of int16 pairs; the edges as in the scalar form.
// (The scalar transposition was ~10% of the attention time: index arithmetic per element, 2-byte stores.)
__attribute__((target("avx2"))) void load_head_avx2(const HeadView& h, int64_t n, int64_t d, int64_t pairs,
                                                    int64_t ld, int16_t* q16, int16_t* kpairs, int32_t* vd) {
  const __m256i qz = _mm256_set1_epi16(static_cast<int16_t>(h.q_zero));
  const __m256i kz = _mm256_set1_epi16(static_cast<int16_t>(h.k_zero)), vz = _mm256_set1_epi32(h.v_zero);
  const int64_t d16 = d / 16 * 16, d8 = d / 8 * 8, n8 = n / 8 * 8;
  for (int64_t i = 0; i < n; ++i) {
    const int8_t *qi = h.q + i * h.q_row, *vi = h.v + i * h.v_row;
    int16_t* qr = q16 + i * 2 * pairs;
    int64_t x = 0;
    for (; x < d16; x += 16) {
      const __m256i q = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qi + x)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + x), _mm256_sub_epi16(q, qz));
    }
    for (; x < d; ++x) qr[x] = static_cast<int16_t>(qi[x] - h.q_zero);
    if (!vd) continue;
    int32_t* vr = vd + i * d;
    for (x = 0; x < d8; x += 8) {
      const __m256i v = _mm256_sub_epi32(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vi + x))), vz);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(vr + x), v);
    }
    for (; x < d; ++x) vr[x] = vi[x] - h.v_zero;
  }
  for (int64_t i0 = 0; i0 < n8; i0 += 8)
    for (int64_t x0 = 0; x0 < d16; x0 += 16) {
      __m256i r[8];
      for (int u = 0; u < 8; ++u)
        r[u] = _mm256_sub_epi16(
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h.k + (i0 + u) * h.k_row + x0))),
            kz);
      transpose8x8_epi32(r);
      for (int u = 0; u < 8; ++u)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(kpairs + ((x0 / 2 + u) * ld + i0) * 2), r[u]);
    }
  for (int64_t i = 0; i < n; ++i) {  // keys past the last block of 8, and values past d16 of the others
    const int8_t* ki = h.k + i * h.k_row;
    for (int64_t x = i < n8 ? d16 : 0; x < d; ++x)
      kpairs[(x / 2) * ld * 2 + i * 2 + x % 2] = static_cast<int16_t>(ki[x] - h.k_zero);
  }
}
#endif

void load_head(const HeadView& h, int64_t n, int64_t d, int64_t pairs, int64_t ld, int16_t* q16, int16_t* kpairs,
               int32_t* vd, Isa isa) {
#if DFQVIT_X86
  if (isa != Isa::kScalar && h.q_col == 1 && h.k_col == 1 && h.v_col == 1)
    return load_head_avx2(h, n, d, pairs, ld, q16, kpairs, vd);
#endif
  load_head_scalar(h, n, d, pairs, ld, q16, kpairs, vd);
}

// Per-call constants of the softmax and the P codes.
struct SoftmaxParams {
  float qk_scale_log2;          // fp32(sm_scale * q_scale * k_scale * log2 e)
  float log2e;
  bool log2_mode;
  float p_param;                // delta (log2) or p_scale (linear)
  float p_zero;
  float ratio_floor;            // log2: 2**-(levels + 2)
  int64_t levels, shift;
  const double* pow2_by_code;   // log2: 2**(shift - k) for k <= shift, 0 at shift + 1
};

// The linear P code of e / sum: clamp(round(e / sum / p_scale) + p_zero, 0, levels - 1).
inline float linear_code(const SoftmaxParams& sp, float e, float sum) {
  const float c = std::nearbyint((e / sum) / sp.p_param) + sp.p_zero;
  return std::fmin(std::fmax(c, 0.0f), static_cast<float>(sp.levels - 1));
}

// Linear P codes as P.V weights: w[j] = code - p_zero.
void linear_weights(const SoftmaxParams& sp, const float* e, int64_t n, float sum, double* w) {
  for (int64_t j = 0; j < n; ++j)
    w[j] = static_cast<double>(linear_code(sp, e[j], sum)) - static_cast<double>(sp.p_zero);
}

#if DFQVIT_X86
// The same weights negated, for the int16 P.V: w16[j] = p_zero - code (used where that fits int16).
void linear_weights16(const SoftmaxParams& sp, const float* e, int64_t n, float sum, int16_t* w16) {
  for (int64_t j = 0; j < n; ++j) w16[j] = static_cast<int16_t>(sp.p_zero - linear_code(sp, e[j], sum));
}
#endif

// The bias and mask terms of a block of query rows (nullptr where absent): t[j] += bias[j * stride] * log2 e, then
// t[j] += mask[j] * log2 e.
struct RowTerms {
  const float* bias[kMaxRows];
  const float* mask[kMaxRows];
  int64_t bias_stride;
};

void add_row_terms(const SoftmaxParams& sp, const RowTerms& terms, int r, int64_t n, float* t) {
  if (const float* bias = terms.bias[r])
    for (int64_t j = 0; j < n; ++j) t[j] = t[j] + bias[j * terms.bias_stride] * sp.log2e;
  if (const float* mask = terms.mask[r])
    for (int64_t j = 0; j < n; ++j) t[j] = t[j] + mask[j] * sp.log2e;
}

// The P.V weights w[j] (float64) of query row r from its exact scores s[j]: t = s * scale [+ bias * log2 e]
// [+ mask * log2 e], e = exp2(t - max t), fixed-point row sum, then log2 or linear codes as weights.
// t, e: n floats of scratch. The scalar form; weights_rows_avx2 gives the same bits.
void weights_row_scalar(const SoftmaxParams& sp, const int32_t* s, const RowTerms& terms, int r, int64_t n, float* t,
                        float* e, double* w) {
  for (int64_t j = 0; j < n; ++j) t[j] = static_cast<float>(s[j]) * sp.qk_scale_log2;
  add_row_terms(sp, terms, r, n, t);
  const float top = *std::max_element(t, t + n);
  int64_t fixed = 0;
  for (int64_t j = 0; j < n; ++j) {
    e[j] = pm::exp2(t[j] - top);
    fixed += pm::fixed_point_term(e[j]);
  }
  const float sum = pm::fixed_point_sum_to_float(fixed);
  if (!sp.log2_mode) return linear_weights(sp, e, n, sum, w);
  for (int64_t j = 0; j < n; ++j) {
    const float ratio = std::max((e[j] / sum) / sp.p_param, sp.ratio_floor);
    const int64_t code = std::clamp<int64_t>(pm::round_neg_log2(ratio), 0, sp.levels);
    w[j] = sp.pow2_by_code[std::min(code, sp.shift + 1)];
  }
}

#if DFQVIT_X86
// weights_row_scalar for `rows` query rows (s, t, e, w: row stride ld = n rounded up to 8) on whole vectors. The
// padding keys (scored by scores_row_avx2 too) get t = -inf: e = 0, nothing added to the row sum, log2 weight 0.
// Stage by stage over all the rows (scale, max, exp2 + row sum, weights), so that the rows' independent chains
// overlap; row by row, each stage waited for the previous one's reduction (max, sum). In-process A/B at the
// CIFAR shape (B 64, 3 heads, n 65, d 64): the attention 4.5% faster on one thread, 2% on two.
// With ecode (log2 mode, AMX P.V: row stride ld_ecode) the weights are written as exponent codes instead of w, with
// w16 (the int16 P.V; row stride ld) as negated int16 weights.
// avx512: exp2 + row sum and the float64 log2 weights on 16 lanes (exp2_fixed_sum_avx512, log2_weights_avx512).
__attribute__((target("avx2"))) void weights_rows_avx2(const SoftmaxParams& sp, const int32_t* s, const RowTerms& terms,
                                                       int rows, int64_t n, int64_t ld, float* t, float* e, double* w,
                                                       uint8_t* ecode, int64_t ld_ecode, int16_t* w16, bool avx512) {
  scale_scores_avx2(s, sp.qk_scale_log2, t, rows * ld);
  float top[kMaxRows], sum[kMaxRows];
  for (int r = 0; r < rows; ++r) {
    float* tr = t + r * ld;
    add_row_terms(sp, terms, r, n, tr);
    std::fill(tr + n, tr + ld, -INFINITY);
    top[r] = max8_avx2(tr, ld);
  }
  for (int r = 0; r < rows; ++r)
    sum[r] = pm::fixed_point_sum_to_float(avx512 ? exp2_fixed_sum_avx512(t + r * ld, top[r], e + r * ld, ld)
                                               : exp2_fixed_sum_avx2(t + r * ld, top[r], e + r * ld, ld));
  for (int r = 0; r < rows; ++r) {
    if (w16 && sp.log2_mode)
      log2_weights_avx2(e + r * ld, ld, sum[r], sp.p_param, sp.ratio_floor, sp.shift, nullptr, nullptr, w16 + r * ld);
    else if (w16)
      linear_weights16(sp, e + r * ld, n, sum[r], w16 + r * ld);
    else if (sp.log2_mode && avx512 && !ecode)
      log2_weights_avx512(e + r * ld, ld, sum[r], sp.p_param, sp.ratio_floor, sp.shift, w + r * ld);
    else if (sp.log2_mode)
      log2_weights_avx2(e + r * ld, ld, sum[r], sp.p_param, sp.ratio_floor, sp.shift, ecode ? nullptr : w + r * ld,
                        ecode ? ecode + r * ld_ecode : nullptr);
    else
      linear_weights(sp, e + r * ld, n, sum[r], w + r * ld);
  }
}
#endif

// P.V weights of `rows` query rows; s, t, e, w with row stride ld (ecode, w16: see weights_rows_avx2; not scalar).
void weights_rows(const SoftmaxParams& sp, const int32_t* s, const RowTerms& terms, int rows, int64_t n, int64_t ld,
                  float* t, float* e, double* w, Isa isa, uint8_t* ecode = nullptr, int64_t ld_ecode = 0,
                  int16_t* w16 = nullptr) {
#if DFQVIT_X86
  if (isa != Isa::kScalar)
    return weights_rows_avx2(sp, s, terms, rows, n, ld, t, e, w, ecode, ld_ecode, w16, has_avx512(isa));
#endif
  for (int r = 0; r < rows; ++r) weights_row_scalar(sp, s + r * ld, terms, r, n, t + r * ld, e + r * ld, w + r * ld);
}

#if DFQVIT_X86
// ---------------------------------------------------------------------------------------------------
// Integer log2 P.V: AMX (Isa::kAmxInt8) and AVX-512 VNNI (one or two planes), head dim a multiple of 16
// ---------------------------------------------------------------------------------------------------
// A weight is a power of two, W_j = 2**x_j with x_j = shift - k_j in [0, shift], shift <= 32. Split by byte, plane p
// holds 2**(x_j - 8p) (1..128, u8) where x_j >> 3 == p and 0 elsewhere, so that
//   sum_j W_j (v_j - v_zero) = sum_p 2**(8p) sum_j plane_p[j] v_j  -  v_zero sum_j W_j
// with V as it is (s8): per plane one TDPBUSD per 64 keys and 16 output columns (|sum| <= n * 128 * 128 < 2**31 for
// n < 2**17), the planes and the zero-point term added exactly (below 2**53 for n <= kExactKeys). That is the
// reference's exact integer, rounded once to fp32 like the float64 path's. Query rows go 16 at a time (one A tile);
// the keys, padded to 8 with no weight (n_keys = ld), in chunks of 64 and a shorter last one (tiles 6 and 7:
// amx_configure_with_tail). Padded to 64 instead, the CIFAR shape (65 keys: 128) was slower than the float64 path.
// On VNNI the same planes and the same packed V go through vpdpbusd (pv_plane_vnni), the rest is shared.

// V of one head as B tiles: vb[(g * quads + q) * 64 + c * 4 + t] = v[4q + t, 16g + c] (zeros past n), quads =
// n_keys / 4. Unit stride along d: four key rows' 16 bytes interleaved per step; otherwise one byte at a time.
__attribute__((target("avx2"))) void pack_v_amx(const HeadView& h, int64_t n, int64_t d, int64_t n_keys, int8_t* vb) {
  const int64_t quads = n_keys / 4;
  for (int64_t g = 0; g < d / 16; ++g)
    for (int64_t q = 0; q < quads; ++q) {
      int8_t* dst = vb + (g * quads + q) * 64;
      if (h.v_col != 1) {
        for (int c = 0; c < 16; ++c)
          for (int t = 0; t < 4; ++t)
            dst[c * 4 + t] = 4 * q + t < n ? h.v[(4 * q + t) * h.v_row + (16 * g + c) * h.v_col] : int8_t(0);
        continue;
      }
      __m128i r[4];
      for (int t = 0; t < 4; ++t)
        r[t] = 4 * q + t < n ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(h.v + (4 * q + t) * h.v_row + 16 * g))
                             : _mm_setzero_si128();
      const __m128i a_lo = _mm_unpacklo_epi8(r[0], r[1]), b_lo = _mm_unpacklo_epi8(r[2], r[3]);
      const __m128i a_hi = _mm_unpackhi_epi8(r[0], r[1]), b_hi = _mm_unpackhi_epi8(r[2], r[3]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi16(a_lo, b_lo));        // columns 0-3
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm_unpackhi_epi16(a_lo, b_lo));   // 4-7
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm_unpacklo_epi16(a_hi, b_hi));   // 8-11
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 48), _mm_unpackhi_epi16(a_hi, b_hi));   // 12-15
    }
}

// plane[i] = 2**(ecode[i] - 1 - 8p) where that exponent is in [0, 8), else 0 (ecode 0: no weight), for size bytes
// (a multiple of 32): a saturating subtract, a min and one table look-up per 32 bytes.
__attribute__((target("avx2"))) void weight_plane_avx2(const uint8_t* ecode, int64_t size, int p, uint8_t* plane) {
  const __m256i table = _mm256_setr_epi8(0, 1, 2, 4, 8, 16, 32, 64, static_cast<char>(128), 0, 0, 0, 0, 0, 0, 0,
                                         0, 1, 2, 4, 8, 16, 32, 64, static_cast<char>(128), 0, 0, 0, 0, 0, 0, 0);
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(8 * p)), top = _mm256_set1_epi8(15);
  for (int64_t i = 0; i < size; i += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ecode + i));
    const __m256i index = _mm256_min_epu8(_mm256_subs_epu8(x, offset), top);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(plane + i), _mm256_shuffle_epi8(table, index));
  }
}

// acc[r, 16g + c] = sum_j plane[r, j] v[j, 16g + c] for 16 rows and the G column groups of one call (C tiles 0..G-1;
// per whole chunk of 64 keys the plane's A tile 4 and V's B tile 5, then with kTail the last keys through tiles 6
// and 7, shaped by amx_configure_with_tail); acc row stride ld_acc.
#define DFQVIT_PV_GROUP(g, a_tile, b_tile, chunk)                                     \
  if constexpr (G > g) {                                                               \
    _tile_loadd(b_tile, vb + (g) * vb_group_bytes + (chunk) * 1024, 64);              \
    _tile_dpbusd(g, a_tile, b_tile);                                                   \
  }
template <int G, bool kTail>
__attribute__((target("amx-tile,amx-int8"))) void pv_plane_amx(const uint8_t* plane, int64_t ld_plane,
                                                               const int8_t* vb, int64_t vb_group_bytes,
                                                               int64_t chunks, int32_t* acc, int64_t ld_acc) {
  _tile_zero(0);
  if constexpr (G > 1) _tile_zero(1);
  if constexpr (G > 2) _tile_zero(2);
  if constexpr (G > 3) _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, plane + c * kAmxBytes, ld_plane);
    DFQVIT_PV_GROUP(0, 4, 5, c)
    DFQVIT_PV_GROUP(1, 4, 5, c)
    DFQVIT_PV_GROUP(2, 4, 5, c)
    DFQVIT_PV_GROUP(3, 4, 5, c)
  }
  if constexpr (kTail) {
    _tile_loadd(6, plane + chunks * kAmxBytes, ld_plane);
    DFQVIT_PV_GROUP(0, 6, 7, chunks)
    DFQVIT_PV_GROUP(1, 6, 7, chunks)
    DFQVIT_PV_GROUP(2, 6, 7, chunks)
    DFQVIT_PV_GROUP(3, 6, 7, chunks)
  }
  const int64_t stride = ld_acc * int64_t(sizeof(int32_t));
  _tile_stored(0, acc, stride);
  if constexpr (G > 1) _tile_stored(1, acc + 16, stride);
  if constexpr (G > 2) _tile_stored(2, acc + 32, stride);
  if constexpr (G > 3) _tile_stored(3, acc + 48, stride);
}
#undef DFQVIT_PV_GROUP

// acc += vpdpbusd(u8 operand w, s8 operand v), registers only. always_inline: Clang 14 called it (an asm
// statement counts as expensive to its inliner).
__attribute__((target("avx512f,avx512vnni"), always_inline)) inline __m512i dpbusd_regs(__m512i acc, __m512i w,
                                                                                         __m512i v) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(v));
  return acc;
}

// Accumulator s<r><g> of row r, column group g; named variables: GCC 12 kept a 2-D array of them on the stack
// (a store and a load around every vpdpbusd), with the intrinsic as with inline asm.
#define DFQVIT_PV_ACCS(X)                                                                     \
  X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3) X(2, 0) X(2, 1) X(2, 2) X(2, 3) \
  X(3, 0) X(3, 1) X(3, 2) X(3, 3)
#define DFQVIT_PV_ZERO(r, g) __m512i s##r##g = _mm512_setzero_si512();
#define DFQVIT_PV_DOT(r, g) if constexpr (R > r && G > g) s##r##g = dpbusd_regs(s##r##g, w##r, v##g);
#define DFQVIT_PV_STORE(r, g) if constexpr (R > r && G > g) _mm512_storeu_si512(acc + r * ld_acc + 16 * g, s##r##g);
#define DFQVIT_PV_V(g) \
  const __m512i v##g = G > g ? _mm512_loadu_si512(vb + (g * quads + q) * 64) : _mm512_setzero_si512();
#define DFQVIT_PV_W(r) const __m512i w##r = R > r ? _mm512_set1_epi32(load_weights4(plane + r * ld_plane + 4 * q)) \
                                                 : _mm512_setzero_si512();

inline int32_t load_weights4(const uint8_t* p) {
  int32_t w4;
  std::memcpy(&w4, p, 4);
  return w4;
}

// The VNNI form of pv_plane_amx: acc[r, 16g + c] = sum_j plane[r, j] v[j, 16g + c] for R (<= 4) rows and G (<= 4)
// column groups, from the same B-tile layout of V (one quad of keys x 16 columns per 64 bytes, s8) and the same u8
// plane; per quad, each row's four weight bytes broadcast (vpdpbusd's unsigned operand) x the G vectors of V,
// loaded once for the R rows.
template <int R, int G>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void pv_plane_block_vnni(const uint8_t* plane, int64_t ld_plane,
                                                                                 const int8_t* vb, int64_t quads,
                                                                                 int32_t* acc, int64_t ld_acc) {
  static_assert(R >= 1 && R <= 4 && G >= 1 && G <= 4, "4 x 4 accumulators at most");
  DFQVIT_PV_ACCS(DFQVIT_PV_ZERO)
  for (int64_t q = 0; q < quads; ++q) {
    DFQVIT_PV_V(0) DFQVIT_PV_V(1) DFQVIT_PV_V(2) DFQVIT_PV_V(3)
    DFQVIT_PV_W(0) DFQVIT_PV_W(1) DFQVIT_PV_W(2) DFQVIT_PV_W(3)
    DFQVIT_PV_ACCS(DFQVIT_PV_DOT)
  }
  DFQVIT_PV_ACCS(DFQVIT_PV_STORE)
}
#undef DFQVIT_PV_ACCS
#undef DFQVIT_PV_ZERO
#undef DFQVIT_PV_DOT
#undef DFQVIT_PV_STORE
#undef DFQVIT_PV_V
#undef DFQVIT_PV_W

template <int R>
void pv_plane_rows_vnni(const uint8_t* plane, int64_t ld_plane, const int8_t* vb, int64_t quads, int64_t groups,
                        int32_t* acc, int64_t ld_acc) {
  using BlockFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*, int64_t);
  static constexpr BlockFn by_groups[4] = {&pv_plane_block_vnni<R, 1>, &pv_plane_block_vnni<R, 2>,
                                           &pv_plane_block_vnni<R, 3>, &pv_plane_block_vnni<R, 4>};
  for (int64_t g0 = 0; g0 < groups; g0 += 4)
    by_groups[std::min<int64_t>(4, groups - g0) - 1](plane, ld_plane, vb + g0 * quads * 64, quads, acc + 16 * g0,
                                                     ld_acc);
}

// pv_plane_block_vnni over `rows` rows (4 at a time) and d / 16 = groups column groups (4 at a time).
void pv_plane_vnni(const uint8_t* plane, int64_t ld_plane, int rows, const int8_t* vb, int64_t quads, int64_t groups,
                   int32_t* acc, int64_t ld_acc) {
  using RowsFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t);
  static constexpr RowsFn by_rows[4] = {&pv_plane_rows_vnni<1>, &pv_plane_rows_vnni<2>, &pv_plane_rows_vnni<3>,
                                        &pv_plane_rows_vnni<4>};
  for (int r = 0; r < rows; r += 4)
    by_rows[std::min(4, rows - r) - 1](plane + r * ld_plane, ld_plane, vb, quads, groups, acc + r * ld_acc, ld_acc);
}

// Scratch of one thread for pv_rows_planes.
struct PlanePvScratch {
  std::vector<uint8_t> ecode, plane;  // kMaxRows x n_keys
  std::vector<int8_t> vb;             // d x n_keys (pack_v_amx)
  std::vector<int32_t> acc;           // planes x kMaxRows x d
};

// sum_i bytes[i] for size bytes (a multiple of 8).
__attribute__((target("avx2"))) inline int64_t byte_sum_avx2(const uint8_t* bytes, int64_t size) {
  __m256i sums = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= size; i += 32)
    sums = _mm256_add_epi64(sums, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + i)),
                                                  _mm256_setzero_si256()));
  __m128i rest = _mm_setzero_si128();
  for (; i < size; i += 8)
    rest = _mm_add_epi64(rest, _mm_sad_epu8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + i)),
                                            _mm_setzero_si128()));
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sums);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + _mm_cvtsi128_si64(rest);
}

// result[r, t] = (fp32(sum_j W_j (v_j - v_zero)) * a) * b for `rows` query rows from their exponent codes (rows
// past `rows`, and keys past n, must hold code 0). The planes' sums and the zero-point term are added in float64:
// every product by 2**(8p) and every partial sum is an integer below 2**53 (n <= kAmxMaxKeys), so exact; the
// rounding to fp32 is the only one, as on the float64 path. AVX-512 (every AMX or VNNI CPU has it): 8 outputs a
// step. amx: each plane through the tiles (pv_plane_amx), else through vpdpbusd (pv_plane_vnni).
__attribute__((target("avx2,avx512f"))) void pv_rows_planes(PlanePvScratch& x, int rows, int64_t n_keys, int64_t d,
                                                             int planes, int32_t v_zero, float a, float b,
                                                             float* result, bool amx) {
  const int64_t quads = n_keys / 4, chunks = n_keys / kAmxBytes, groups = d / 16;
  const bool tail = n_keys % kAmxBytes != 0;
  using PlaneFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t);
  static constexpr PlaneFn pv_plane[2][4] = {  // [short last chunk][column groups - 1]
      {&pv_plane_amx<1, false>, &pv_plane_amx<2, false>, &pv_plane_amx<3, false>, &pv_plane_amx<4, false>},
      {&pv_plane_amx<1, true>, &pv_plane_amx<2, true>, &pv_plane_amx<3, true>, &pv_plane_amx<4, true>}};
  int64_t weight_sum[kMaxRows] = {};  // sum_j W_j per row, from the planes' byte sums
  for (int p = 0; p < planes; ++p) {
    weight_plane_avx2(x.ecode.data(), kMaxRows * n_keys, p, x.plane.data());
    for (int r = 0; r < rows; ++r) weight_sum[r] += byte_sum_avx2(x.plane.data() + r * n_keys, n_keys) << (8 * p);
    if (!amx) {
      pv_plane_vnni(x.plane.data(), n_keys, rows, x.vb.data(), quads, groups, x.acc.data() + p * kMaxRows * d, d);
      continue;
    }
    for (int64_t g0 = 0; g0 < groups; g0 += 4) {
      const int8_t* vb = x.vb.data() + g0 * quads * 64;
      int32_t* acc = x.acc.data() + p * kMaxRows * d + g0 * 16;
      pv_plane[tail][std::min<int64_t>(4, groups - g0) - 1](x.plane.data(), n_keys, vb, quads * 64, chunks, acc, d);
    }
  }
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  __m512d plane_scale[5];  // 2**(8p); planes <= 5 (shift <= 32)
  for (int p = 0; p < planes; ++p) plane_scale[p] = _mm512_set1_pd(static_cast<double>(int64_t(1) << (8 * p)));
  for (int r = 0; r < rows; ++r) {
    const __m512d zero_term = _mm512_set1_pd(-static_cast<double>(int64_t(v_zero) * weight_sum[r]));
    for (int64_t t = 0; t < d; t += 8) {
      __m512d total = zero_term;
      for (int p = 0; p < planes; ++p) {
        const __m256i part = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.acc.data() + (p * kMaxRows + r) * d + t));
        total = _mm512_fmadd_pd(_mm512_cvtepi32_pd(part), plane_scale[p], total);
      }
      _mm256_storeu_ps(result + r * d + t, _mm256_mul_ps(_mm256_mul_ps(_mm512_cvtpd_ps(total), va), vb));
    }
  }
}
#endif

at::Tensor native_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double q_scale,
                            int64_t q_zero, double k_scale, int64_t k_zero, double v_scale, int64_t v_zero,
                            double sm_scale, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& mask, int64_t p_mode, double p_param, int64_t p_zero,
                            int64_t p_bits, at::ScalarType out_dtype, c10::optional<double> out_scale_q,
                            int64_t out_zero, int64_t out_qmin, int64_t out_qmax, bool token_major) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes() && q.scalar_type() == at::kChar &&
                  k.scalar_type() == at::kChar && v.scalar_type() == at::kChar,
              "dfqvit native attention: q, k, v must be int8 (B, H, N, d) of one shape, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
  TORCH_CHECK(d <= 256, "dfqvit native attention: head dim ", d, " > 256 (QK^T exactness in fp32 needs d <= 256).");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "dfqvit native attention: out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  // With out_scale_q: int8 codes of the out_dtype result on that grid (what the projection GEMM reads).
  const bool requant = out_scale_q.has_value();
  const Grid out_grid = requant ? make_grid(*out_scale_q, out_zero, out_qmin, out_qmax) : Grid{1.0f, 0.0f, 0.0f, 0.0f};
  const Isa isa = active_isa();
  at::Tensor bias_f, mask_c;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).expand({batch, heads, n, n});
  if (mask.has_value()) mask_c = mask->to(at::kFloat).contiguous();
  const int64_t windows = mask_c.defined() ? mask_c.size(0) : 1;

  const int64_t levels = int64_t(1) << p_bits;
  const int64_t shift = std::min<int64_t>(levels - 1, 32);  // reference.log2_pv_shift
  std::vector<double> pow2_by_code(shift + 2, 0.0);
  for (int64_t c = 0; c <= shift; ++c) pow2_by_code[c] = std::ldexp(1.0, static_cast<int>(shift - c));
  const SoftmaxParams sp{static_cast<float>(sm_scale * q_scale * k_scale * kLog2E), static_cast<float>(kLog2E),
                         p_mode == kModeLog2, static_cast<float>(p_param), static_cast<float>(p_zero),
                         static_cast<float>(std::ldexp(1.0, -static_cast<int>(levels + 2))), levels, shift,
                         pow2_by_code.data()};
  // The exact integer P.V, rounded once to fp32, times 2**-S (log2) and fp32(delta or p_scale * v_scale).
  const float inv_two_s = p_mode == kModeLog2 ? std::ldexp(1.0f, -static_cast<int>(shift)) : 1.0f;
  const float out_scale = static_cast<float>(p_param * v_scale);
  const int64_t ld = (n + 7) / 8 * 8, pairs = (d + 1) / 2;
  // AMX P.V for log2 codes (see pv_rows_planes): 16 query rows per block instead of kPvRows. Where it pays (in-process
  // A/B against the float64 path, B x H heads, 2-core Xeon): d 64 with 128+ keys 1.26-1.47x (n 128, 197, 577; P4
  // and P8), n 65 with two planes (P4) 1.10x; with five planes (P8) at n 65 0.94x, and d 32 0.96-1.04x (n 49, 197).
  const int planes = static_cast<int>(shift / 8 + 1);
  const bool amx_pv = isa == Isa::kAmxInt8 && p_mode == kModeLog2 && d % 16 == 0 && d >= 64 &&
                      (n >= 128 || planes <= 2) && n <= kAmxMaxKeys;
  // The same planes on AVX-512 VNNI (pv_plane_vnni) where they pay, in-process A/B against the float64 P.V on the
  // 2-core Zen 5 VM: one or two planes (3- and 4-bit codes), d 64 and 80: 1.13-1.37x (n 49-577), 1.03x at n 17,
  // 0.98x at n 9; d 32 0.97-1.01x; five planes (8-bit codes) 1.00x.
  const bool vnni_pv = isa == Isa::kAvx512Vnni && p_mode == kModeLog2 && d % 16 == 0 && d >= 64 && planes <= 2 &&
                       n >= 16 && n <= kAmxMaxKeys;
  const bool plane_pv = amx_pv || vnni_pv;
  // The int16 P.V (exact_pv16_rows) on the AVX2 rung where the weights fit int16 (negated: 2**15 for log2, below
  // that for linear codes). In-process A/B against the float64 P.V on a 2-core AMD EPYC of family 23 (AVX2): the
  // attention 1.39x at the CIFAR shape (B 64, 3 heads, n 65, d 64; P3 and P4), 1.49x at n 197 and 577 (d 64, P4),
  // 1.28x at Swin's n 49, d 32 (P4) and with 8-bit linear codes (n 65); the CIFAR engine at W4A4 1.06x.
  const int64_t max_weight = p_mode == kModeLog2 ? int64_t(1) << shift
                                                 : std::max(std::abs(p_zero), std::abs(levels - 1 - p_zero)) + 1;
  const int64_t pv16_keys = pv16_chunk_keys(max_weight, std::max(std::abs(-128 - v_zero), std::abs(127 - v_zero)));
  const bool pv16 = isa == Isa::kAvx2 && pv16_keys >= 8;
  const int block_rows = plane_pv ? kAmxRows : kPvRows;
  [[maybe_unused]] const int64_t n_keys = plane_pv ? ld : 0;  // x86 only

  // (B, H, N, d), or token-major (B, N, H, d): the projection's input layout, no transpose copy after.
  at::Tensor out = token_major ? at::empty({batch, n, heads, d}, requant ? at::kChar : at::kFloat)
                               : at::empty({batch, heads, n, d}, requant ? at::kChar : at::kFloat);
  float* op = requant ? nullptr : out.data_ptr<float>();
  int8_t* oq = requant ? out.data_ptr<int8_t>() : nullptr;
  const int64_t row_stride = token_major ? heads * d : d;  // between query rows of one (batch, head)
  const int8_t *qp = q.data_ptr<int8_t>(), *kp = k.data_ptr<int8_t>(), *vp = v.data_ptr<int8_t>();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const float* mp = mask_c.defined() ? mask_c.data_ptr<float>() : nullptr;
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  const std::vector<int64_t> bs = bias_f.defined() ? bias_f.strides().vec() : std::vector<int64_t>(4, 0);
  parallel_claims(batch * heads, 1, [&](auto& claim) {  // one (batch, head) per claim
    std::vector<int16_t> q16(n * 2 * pairs, 0), kpairs(pairs * ld * 2, 0);
    std::vector<int32_t> s32(kMaxRows * ld);
    std::vector<float> t(kMaxRows * ld), e(kMaxRows * ld), result(kMaxRows * d);
    std::vector<int32_t> vd(plane_pv ? 0 : n * d);  // centred V for the float64 and int16 P.V
    std::vector<double> w(pv16 ? 0 : kPvRows * ld), partial(pv16 ? 0 : kPvRows * d);
    std::vector<int16_t> w16(pv16 ? kPvRows * ld : 0), v_pairs(pv16 ? ld * d : 0);
    std::vector<int32_t> sums16(pv16 ? kPvRows * d : 0);
    std::vector<int64_t> totals(kPvRows * d);
#if DFQVIT_X86
    PlanePvScratch plane_scratch;
    if (plane_pv) {
      plane_scratch.ecode.assign(kMaxRows * n_keys, 0);
      plane_scratch.plane.resize(kMaxRows * n_keys);
      plane_scratch.vb.resize(d * n_keys);
      plane_scratch.acc.resize(planes * kMaxRows * d);
    }
#endif
    for (int64_t bh, last; claim(&bh, &last);) {
      const int64_t b = bh / heads, h = bh % heads;
      const HeadView view{qp + b * qs[0] + h * qs[1], kp + b * ks[0] + h * ks[1], vp + b * vs[0] + h * vs[1],
                          qs[2], qs[3], ks[2], ks[3], vs[2], vs[3], static_cast<int32_t>(q_zero),
                          static_cast<int32_t>(k_zero), static_cast<int32_t>(v_zero)};
      load_head(view, n, d, pairs, ld, q16.data(), kpairs.data(), plane_pv ? nullptr : vd.data(), isa);
#if DFQVIT_X86
      if (pv16) pack_v_pairs(vd.data(), n, d, v_pairs.data());
      if (plane_pv) pack_v_amx(view, n, d, n_keys, plane_scratch.vb.data());
      if (amx_pv) {
        if (n_keys % kAmxBytes)
          amx_configure_with_tail(static_cast<int>(n_keys % kAmxBytes));
        else
          amx_configure();
      }
#endif
      // block_rows query rows at a time: their scores, their weights, then one P.V block that reads V once for all.
      for (int64_t i0 = 0; i0 < n; i0 += block_rows) {
        const int rows = static_cast<int>(std::min<int64_t>(block_rows, n - i0));
        RowTerms terms{{}, {}, bs[3]};
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          scores_row(q16.data() + i * 2 * pairs, kpairs.data(), ld, n, pairs, s32.data() + r * ld, isa);
          terms.bias[r] = bp ? bp + b * bs[0] + h * bs[1] + i * bs[2] : nullptr;
          terms.mask[r] = mp ? mp + ((b % windows) * n + i) * n : nullptr;
        }
#if DFQVIT_X86
        if (plane_pv) {
          if (rows < kMaxRows)  // the A tiles read 16 rows: those past the block weigh nothing
            std::fill(plane_scratch.ecode.begin() + rows * n_keys, plane_scratch.ecode.end(), uint8_t(0));
          weights_rows(sp, s32.data(), terms, rows, n, ld, t.data(), e.data(), nullptr, isa,
                       plane_scratch.ecode.data(), n_keys);
          pv_rows_planes(plane_scratch, rows, n_keys, d, planes, static_cast<int32_t>(v_zero), inv_two_s, out_scale,
                         result.data(), amx_pv);
        } else if (pv16) {
          weights_rows(sp, s32.data(), terms, rows, n, ld, t.data(), e.data(), nullptr, isa, nullptr, 0, w16.data());
          exact_pv16_rows(w16.data(), ld, rows, v_pairs.data(), n, d, pv16_keys, inv_two_s, out_scale, sums16.data(),
                          totals.data(), result.data());
        } else
#endif
        {
          weights_rows(sp, s32.data(), terms, rows, n, ld, t.data(), e.data(), w.data(), isa);
          exact_pv_rows(w.data(), ld, rows, vd.data(), n, d, inv_two_s, out_scale, partial.data(), totals.data(),
                        result.data(), isa);
        }
        const int64_t first = token_major ? ((b * n + i0) * heads + h) * d : (bh * n + i0) * d;
        for (int r = 0; r < rows; ++r) {
          float* y = result.data() + r * d;
          if (!requant) {
            std::copy(y, y + d, op + first + r * row_stride);
            continue;
          }
          if (out_dtype == at::kHalf)  // the codes of the out_dtype value, as quantizing the returned tensor
            for (int64_t x = 0; x < d; ++x) y[x] = static_cast<float>(c10::Half(y[x]));
          else if (out_dtype == at::kBFloat16)
            for (int64_t x = 0; x < d; ++x) y[x] = static_cast<float>(c10::BFloat16(y[x]));
          quantize_row(y, d, out_grid, oq + first + r * row_stride, isa);
        }
      }
    }
  });
  return requant || out_dtype == at::kFloat ? out : out.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dfqvit, m) {
  m.def("native_attention(Tensor q, Tensor k, Tensor v, float q_scale, int q_zero, float k_scale, int k_zero, "
        "float v_scale, int v_zero, float sm_scale, Tensor? bias, Tensor? mask, int p_mode, float p_param, "
        "int p_zero, int p_bits, ScalarType out_dtype, float? out_scale=None, int out_zero=0, int out_qmin=0, "
        "int out_qmax=0, bool token_major=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(dfqvit, CPU, m) { m.impl("native_attention", &native_attention); }

}  // namespace dfqvit
