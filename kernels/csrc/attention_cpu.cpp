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
// Log2 P.V by shifts and adds: V rows are summed per code level in int32, then the levels are combined with
// their powers of two in float64 (integers below 2**53: exact in any order). Linear P.V: float64 rows, exact.
// One (batch, head) pair per task on torch's OpenMP pool; Q, K, V are read once per head (strided views are
// fine) into centred int16 / int32 buffers; the row loops are AVX2 (scalar on other CPUs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "portable_math.h"

namespace dfqvit {
namespace {

constexpr double kLog2E = 1.4426950408889634;
constexpr int64_t kModeLog2 = 0;
constexpr int32_t kSkip = 1 << 20;  // a log2 code that adds nothing to P.V

#if DFQVIT_X86
__attribute__((target("avx2"))) int64_t exp2_row_avx2(const float* d, float* e, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(e + i, pm::exp2_avx2(_mm256_loadu_ps(d + i)));
  return i;
}

// Log2 codes of 8 probabilities at a time: k = round(-log2 max(p / delta, floor)) clamped at 0, or kSkip where
// the level adds nothing to P.V (k > shift, or a ratio below 2**-126, whose k >= 126 > 32 >= shift).
// Returns how many were done.
__attribute__((target("avx2"))) int64_t log2_codes_avx2(const float* e, int64_t n, float sum, float delta,
                                                         float floor, int64_t shift, int32_t* codes) {
  const __m256 vsum = _mm256_set1_ps(sum), vdelta = _mm256_set1_ps(delta), vfloor = _mm256_set1_ps(floor);
  const __m256 normal = _mm256_set1_ps(1.17549435e-38f);
  const __m256i vshift = _mm256_set1_epi32(static_cast<int32_t>(shift)), zero = _mm256_setzero_si256();
  const __m256i exp_mask = _mm256_set1_epi32(0xFF), mant_mask = _mm256_set1_epi32(0x7FFFFF);
  const __m256i sqrt2_mant = _mm256_set1_epi32(0x3504F3), bias = _mm256_set1_epi32(127);
  const __m256i skip = _mm256_set1_epi32(kSkip);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 p = _mm256_div_ps(_mm256_loadu_ps(e + j), vsum);
    const __m256 ratio = _mm256_max_ps(_mm256_div_ps(p, vdelta), vfloor);
    const __m256i bits = _mm256_castps_si256(ratio);
    const __m256i exponent = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), exp_mask), bias);
    // k = -E - (mantissa > sqrt 2); mantissa bits above 0x3504F3 <=> m > sqrt(2)
    const __m256i up = _mm256_cmpgt_epi32(_mm256_and_si256(bits, mant_mask), sqrt2_mant);  // -1 or 0
    const __m256i k = _mm256_max_epi32(_mm256_add_epi32(_mm256_sub_epi32(zero, exponent), up), zero);
    const __m256i tiny = _mm256_castps_si256(_mm256_cmp_ps(ratio, normal, _CMP_LT_OQ));
    const __m256i beyond = _mm256_or_si256(_mm256_cmpgt_epi32(k, vshift), tiny);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + j), _mm256_blendv_epi8(k, skip, beyond));
  }
  return j;
}

// scores[j] = sum_t q[t] * k[j, t] with int16 pairs: kp holds K transposed in pairs, kp[(t/2) * ld * 2 + j * 2 + t%2].
__attribute__((target("avx2"))) void scores_row_avx2(const int16_t* q, const int16_t* kp, int64_t ld, int64_t n,
                                                     int64_t pairs, int32_t* scores) {
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int blocks = static_cast<int>(std::min<int64_t>(8, (n - j0 + 7) / 8));
    __m256i acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_si256();
    for (int64_t t = 0; t < pairs; ++t) {
      int32_t qq;
      std::memcpy(&qq, q + 2 * t, 4);
      const __m256i qt = _mm256_set1_epi32(qq);
      const int16_t* row = kp + (t * ld + j0) * 2;
      for (int u = 0; u < blocks; ++u)
        acc[u] = _mm256_add_epi32(acc[u], _mm256_madd_epi16(qt, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * u))));
    }
    alignas(32) int32_t tmp[64];
    for (int u = 0; u < blocks; ++u) _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8 * u), acc[u]);
    for (int64_t j = j0; j < std::min<int64_t>(n, j0 + 64); ++j) scores[j] = tmp[j - j0];
  }
}
#endif

// e[j] = exp2(d[j]) for a row; AVX2 and scalar give the same bits.
void exp2_row(const float* d, float* e, int64_t n, Isa isa) {
  int64_t j = 0;
#if DFQVIT_X86
  if (isa != Isa::kScalar) j = exp2_row_avx2(d, e, n);
#endif
  for (; j < n; ++j) e[j] = pm::exp2(d[j]);
}

#if DFQVIT_X86
// out[t] = sum_j w[j] * v[j * d + t] in float64 (integers below 2**53: exact).
__attribute__((target("avx2"))) void pv_row_avx2(const double* w, const double* v, int64_t n, int64_t d, double* out) {
  for (int64_t t0 = 0; t0 < d; t0 += 32) {
    const int blocks = static_cast<int>(std::min<int64_t>(8, (d - t0) / 4));
    __m256d acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_pd();
    for (int64_t j = 0; j < n; ++j) {
      if (w[j] == 0.0) continue;
      const __m256d wj = _mm256_set1_pd(w[j]);
      const double* row = v + j * d + t0;
      for (int u = 0; u < blocks; ++u) acc[u] = _mm256_add_pd(acc[u], _mm256_mul_pd(wj, _mm256_loadu_pd(row + 4 * u)));
    }
    for (int u = 0; u < blocks; ++u) _mm256_storeu_pd(out + t0 + 4 * u, acc[u]);
    for (int64_t t = t0 + 4 * blocks; t < std::min<int64_t>(d, t0 + 32); ++t) {
      double total = 0.0;
      for (int64_t j = 0; j < n; ++j) total += w[j] * v[j * d + t];
      out[t] = total;
    }
  }
}
#endif

void scores_row(const int16_t* q, const int16_t* kp, int64_t ld, int64_t n, int64_t pairs, int32_t* scores, Isa isa) {
#if DFQVIT_X86
  if (isa != Isa::kScalar) return scores_row_avx2(q, kp, ld, n, pairs, scores);
#endif
  for (int64_t j = 0; j < n; ++j) {
    int32_t total = 0;
    for (int64_t t = 0; t < 2 * pairs; ++t) total += int32_t(q[t]) * int32_t(kp[((t / 2) * ld + j) * 2 + t % 2]);
    scores[j] = total;
  }
}

#if DFQVIT_X86
// log2_pv_row in one AVX2 function, without data-dependent branches in the key loop: a skipped key (code past
// the shift) adds into a spare bucket that is never combined, and buckets are zeroed after they are combined
// (they start the next row at zero) instead of being initialised on first touch. Calling add_row /
// combine_row per key and per level (not inlinable across targets) took ~30% of a layer's time; the branch-free
// loop gains another 0-4% (A/B in one process). buckets holds shift + 2 rows of d int32, zero on entry and return.
__attribute__((target("avx2"))) void log2_pv_row_avx2(const int32_t* codes, const int32_t* v, int64_t n, int64_t d,
                                                       int64_t shift, int32_t* buckets, double* out) {
  const int64_t d8 = d / 8 * 8, d4 = d / 4 * 4, spare = shift + 1;
  uint64_t touched = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t level = std::min<int64_t>(codes[j], spare);
    touched |= uint64_t(1) << level;
    int32_t* bucket = buckets + level * d;
    const int32_t* vj = v + j * d;
    for (int64_t t = 0; t < d8; t += 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bucket + t),
                          _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bucket + t)),
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vj + t))));
    for (int64_t t = d8; t < d; ++t) bucket[t] += vj[t];
  }
  for (int64_t t = 0; t < d; ++t) out[t] = 0.0;
  for (uint64_t left = touched; left; left &= left - 1) {
    const int64_t k = __builtin_ctzll(left);
    int32_t* bucket = buckets + k * d;
    if (k <= shift) {
      const double w = std::ldexp(1.0, static_cast<int>(shift - k));
      const __m256d vw = _mm256_set1_pd(w);
      for (int64_t t = 0; t < d4; t += 4) {
        const __m256d b = _mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bucket + t)));
        _mm256_storeu_pd(out + t, _mm256_add_pd(_mm256_loadu_pd(out + t), _mm256_mul_pd(vw, b)));
      }
      for (int64_t t = d4; t < d; ++t) out[t] += w * static_cast<double>(bucket[t]);
    }
    std::memset(bucket, 0, d * sizeof(int32_t));
  }
}
#endif

// Log2 P.V by shifts and adds: V rows are summed per code level in int32 (|sum| <= 255 * 256), then the levels
// are combined as sum_k 2**(shift - k) * bucket_k in float64 (integers below 2**53: exact in any order). Same
// bucket protocol as log2_pv_row_avx2 (spare bucket for skipped keys, zero on entry and return).
void log2_pv_row(const int32_t* codes, const int32_t* v, int64_t n, int64_t d, int64_t shift, int32_t* buckets,
                 double* out, Isa isa) {
#if DFQVIT_X86
  if (isa != Isa::kScalar) return log2_pv_row_avx2(codes, v, n, d, shift, buckets, out);
#endif
  const int64_t spare = shift + 1;
  uint64_t touched = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t level = std::min<int64_t>(codes[j], spare);
    touched |= uint64_t(1) << level;
    for (int64_t t = 0; t < d; ++t) buckets[level * d + t] += v[j * d + t];
  }
  for (int64_t t = 0; t < d; ++t) out[t] = 0.0;
  for (uint64_t left = touched; left; left &= left - 1) {
    const int64_t k = __builtin_ctzll(left);
    int32_t* bucket = buckets + k * d;
    if (k <= shift) {
      const double w = std::ldexp(1.0, static_cast<int>(shift - k));
      for (int64_t t = 0; t < d; ++t) out[t] += w * static_cast<double>(bucket[t]);
    }
    std::memset(bucket, 0, d * sizeof(int32_t));
  }
}

void pv_row(const double* w, const double* v, int64_t n, int64_t d, double* out, Isa isa) {
#if DFQVIT_X86
  if (isa != Isa::kScalar) return pv_row_avx2(w, v, n, d, out);
#endif
  for (int64_t t = 0; t < d; ++t) out[t] = 0.0;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t t = 0; t < d; ++t) out[t] += w[j] * v[j * d + t];
}

at::Tensor native_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double q_scale,
                            int64_t q_zero, double k_scale, int64_t k_zero, double v_scale, int64_t v_zero,
                            double sm_scale, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& mask, int64_t p_mode, double p_param, int64_t p_zero,
                            int64_t p_bits, at::ScalarType out_dtype) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes() && q.scalar_type() == at::kChar &&
                  k.scalar_type() == at::kChar && v.scalar_type() == at::kChar,
              "dfqvit native attention: q, k, v must be int8 (B, H, N, d) of one shape, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
  TORCH_CHECK(d <= 256, "dfqvit native attention: head dim ", d, " > 256 (QK^T exactness in fp32 needs d <= 256).");
  const Isa isa = active_isa();
  at::Tensor bias_f, mask_c;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).expand({batch, heads, n, n});
  if (mask.has_value()) mask_c = mask->to(at::kFloat).contiguous();
  const int64_t windows = mask_c.defined() ? mask_c.size(0) : 1;

  const float qk_scale_log2 = static_cast<float>(sm_scale * q_scale * k_scale * kLog2E);
  const float log2e = static_cast<float>(kLog2E);
  const int64_t levels = int64_t(1) << p_bits;
  const int64_t shift = std::min<int64_t>(levels - 1, 32);  // reference.log2_pv_shift
  const float ratio_floor = static_cast<float>(std::ldexp(1.0, -static_cast<int>(levels + 2)));
  const float p_param_f = static_cast<float>(p_param), p_zero_f = static_cast<float>(p_zero);
  const float inv_two_s = std::ldexp(1.0f, -static_cast<int>(shift));
  const float out_scale = static_cast<float>(p_param * v_scale);  // fp32(delta * v_scale) or fp32(p_scale * v_scale)
  const int64_t ld = (n + 7) / 8 * 8, pairs = (d + 1) / 2;

  at::Tensor out = at::empty({batch, heads, n, d}, at::kFloat);
  float* op = out.data_ptr<float>();
  const int8_t *qp = q.data_ptr<int8_t>(), *kp = k.data_ptr<int8_t>(), *vp = v.data_ptr<int8_t>();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const float* mp = mask_c.defined() ? mask_c.data_ptr<float>() : nullptr;
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  const std::vector<int64_t> bs = bias_f.defined() ? bias_f.strides().vec() : std::vector<int64_t>(4, 0);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> q16(n * 2 * pairs, 0), kpairs(pairs * ld * 2, 0);
    std::vector<int32_t> v32(n * d), s32(n), codes(n), buckets((shift + 2) * d, 0);
    std::vector<float> t(n), e(n);
    std::vector<double> vd(p_mode == kModeLog2 ? 0 : n * d), w(n), acc(d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const int8_t* qh = qp + b * qs[0] + h * qs[1];
      const int8_t* kh = kp + b * ks[0] + h * ks[1];
      const int8_t* vh = vp + b * vs[0] + h * vs[1];
      for (int64_t i = 0; i < n; ++i) {
        const int8_t *qi = qh + i * qs[2], *vi = vh + i * vs[2];
        int16_t* qrow = q16.data() + i * 2 * pairs;
        int32_t* vrow = v32.data() + i * d;
        for (int64_t x = 0; x < d; ++x) qrow[x] = static_cast<int16_t>(qi[x * qs[3]] - q_zero);
        for (int64_t x = 0; x < d; ++x) vrow[x] = vi[x * vs[3]] - static_cast<int32_t>(v_zero);
      }
      // K transposed into int16 pairs, written in order (the rows of one head sit in L1).
      for (int64_t x = 0; x < d; ++x) {
        int16_t* out = kpairs.data() + (x / 2) * ld * 2 + x % 2;
        const int8_t* col = kh + x * ks[3];
        for (int64_t i = 0; i < n; ++i) out[2 * i] = static_cast<int16_t>(col[i * ks[2]] - k_zero);
      }
      if (p_mode != kModeLog2)
        for (int64_t x = 0; x < n * d; ++x) vd[x] = static_cast<double>(v32[x]);
      for (int64_t i = 0; i < n; ++i) {
        scores_row(q16.data() + i * 2 * pairs, kpairs.data(), ld, n, pairs, s32.data(), isa);  // exact integers
        for (int64_t j = 0; j < n; ++j) t[j] = static_cast<float>(s32[j]) * qk_scale_log2;
        if (bp) {
          const int64_t base = b * bs[0] + h * bs[1] + i * bs[2];
          for (int64_t j = 0; j < n; ++j) t[j] = t[j] + bp[base + j * bs[3]] * log2e;
        }
        if (mp) {
          const float* mrow = mp + ((b % windows) * n + i) * n;
          for (int64_t j = 0; j < n; ++j) t[j] = t[j] + mrow[j] * log2e;
        }
        float top = t[0];
        for (int64_t j = 1; j < n; ++j) top = std::max(top, t[j]);
        for (int64_t j = 0; j < n; ++j) t[j] = t[j] - top;
        exp2_row(t.data(), e.data(), n, isa);
        int64_t fixed = 0;
        for (int64_t j = 0; j < n; ++j) fixed += pm::fixed_point_term(e[j]);
        const float sum = pm::fixed_point_sum_to_float(fixed);
        if (p_mode == kModeLog2) {
          int64_t j = 0;
#if DFQVIT_X86
          if (isa != Isa::kScalar) j = log2_codes_avx2(e.data(), n, sum, p_param_f, ratio_floor, shift, codes.data());
#endif
          for (; j < n; ++j) {
            const float ratio = std::max((e[j] / sum) / p_param_f, ratio_floor);
            const int64_t code = std::clamp<int64_t>(pm::round_neg_log2(ratio), 0, levels);
            codes[j] = code <= shift ? static_cast<int32_t>(code) : kSkip;
          }
          log2_pv_row(codes.data(), v32.data(), n, d, shift, buckets.data(), acc.data(), isa);
        } else {
          for (int64_t j = 0; j < n; ++j) {
            float c = std::nearbyint((e[j] / sum) / p_param_f) + p_zero_f;
            c = std::fmin(std::fmax(c, 0.0f), static_cast<float>(levels - 1));
            w[j] = static_cast<double>(c) - static_cast<double>(p_zero);
          }
          pv_row(w.data(), vd.data(), n, d, acc.data(), isa);
        }
        float* orow = op + (bh * n + i) * d;
        const double* accp = acc.data();
        if (p_mode == kModeLog2) {  // the exact integer, rounded once, then the two fp32 scalings
          for (int64_t x = 0; x < d; ++x) orow[x] = (static_cast<float>(accp[x]) * inv_two_s) * out_scale;
        } else {
          for (int64_t x = 0; x < d; ++x) orow[x] = static_cast<float>(accp[x]) * out_scale;
        }
      }
    }
  });
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dfqvit, m) {
  m.def("native_attention(Tensor q, Tensor k, Tensor v, float q_scale, int q_zero, float k_scale, int k_zero, "
        "float v_scale, int v_zero, float sm_scale, Tensor? bias, Tensor? mask, int p_mode, float p_param, "
        "int p_zero, int p_bits, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(dfqvit, CPU, m) { m.impl("native_attention", &native_attention); }

}  // namespace dfqvit
