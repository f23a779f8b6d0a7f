// dfqvit::native_attention: int8 Q, K, V -> exact int32 QK^T -> portable base-2 softmax -> log2 (or linear)
// P codes -> P.V by shifts and adds, on the CPU; bit for bit kernels/reference.py:attention_log2_reference /
// attention_linear_reference.
//
// One (batch, head) pair per task (at::parallel_for). Per row of queries:
//   t_j  = fp32(sum_d (q - q_zero)(k_j - k_zero)) * fp32(scale * log2 e) [+ bias * log2 e] [+ mask * log2 e]
//   e_j  = exp2(t_j - max t)                   (portable_math.h: polynomial + exponent bits)
//   p_j  = e_j / fp32(sum_j trunc(e_j 2**53)) 2**-53   (int64 fixed point: any order, same bits)
//   log2: k_j = clamp(round(-log2 max(p_j / delta, floor)), 0, 2**bits)  (frexp: exact)
//         out = fp32(sum_j (v_j - v_zero) 2**(S - k_j)) * 2**-S * fp32(delta * v_scale)
//   linear: c_j = clamp(round(p_j / p_scale) + p_zero, 0, 2**bits - 1)
//         out = fp32(sum_j (c_j - p_zero)(v_j - v_zero)) * fp32(p_scale * v_scale)
// The P.V sums are integers below 2**53, accumulated exactly in float64 (vectorisable, order-free).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "portable_math.h"

namespace dfqvit {
namespace {

constexpr double kLog2E = 1.4426950408889634;
constexpr int64_t kModeLog2 = 0;

#if DFQVIT_X86
__attribute__((target("avx2"))) int64_t exp2_row_avx2(const float* d, float* e, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(e + i, pm::exp2_avx2(_mm256_loadu_ps(d + i)));
  return i;
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

__attribute__((target_clones("avx2", "default"))) void qk_row(const int16_t* q, const int16_t* k, int64_t n,
                                                               int64_t d, int32_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    const int16_t* kj = k + j * d;
    int32_t s = 0;
    for (int64_t t = 0; t < d; ++t) s += int32_t(q[t]) * int32_t(kj[t]);
    out[j] = s;
  }
}

__attribute__((target_clones("avx2", "default"))) void pv_row(const double* weights, const double* v, int64_t n,
                                                               int64_t d, double* out) {
  for (int64_t t = 0; t < d; ++t) out[t] = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double w = weights[j];
    if (w == 0.0) continue;
    const double* vj = v + j * d;
    for (int64_t t = 0; t < d; ++t) out[t] += w * vj[t];  // integers < 2**53: exact in any order
  }
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
  const Isa isa = active_isa();
  // Centered operands, contiguous per (b, h): Q, K as int16, V as float64.
  const at::Tensor qc = (q.to(at::kShort) - q_zero).contiguous();
  const at::Tensor kc = (k.to(at::kShort) - k_zero).contiguous();
  const at::Tensor vc = (v.to(at::kDouble) - static_cast<double>(v_zero)).contiguous();
  // The additive terms as fp32 (B, H, N, N) views (stride 0 where broadcast), like the reference.
  at::Tensor bias_f, mask_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).expand({batch, heads, n, n});
  if (mask.has_value()) mask_f = mask->to(at::kFloat);
  const int64_t windows = mask_f.defined() ? mask_f.size(0) : 1;

  const float qk_scale_log2 = static_cast<float>(sm_scale * q_scale * k_scale * kLog2E);
  const float log2e = static_cast<float>(kLog2E);
  const int64_t levels = int64_t(1) << p_bits;
  const int64_t shift = std::min<int64_t>(levels - 1, 32);  // reference.log2_pv_shift
  const float ratio_floor = static_cast<float>(std::ldexp(1.0, -static_cast<int>(levels + 2)));
  const float p_param_f = static_cast<float>(p_param), p_zero_f = static_cast<float>(p_zero);
  const float out_scale_log2 = static_cast<float>(p_param * v_scale);
  const float pv_scale_linear = static_cast<float>(p_param * v_scale);
  const float inv_two_s = static_cast<float>(std::ldexp(1.0, -static_cast<int>(shift)));

  at::Tensor out = at::empty({batch, heads, n, d}, at::kFloat);
  const int16_t* qp = qc.data_ptr<int16_t>();
  const int16_t* kp = kc.data_ptr<int16_t>();
  const double* vp = vc.data_ptr<double>();
  float* op = out.data_ptr<float>();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const at::Tensor mask_c = mask_f.defined() ? mask_f.contiguous() : at::Tensor();
  const float* mp = mask_c.defined() ? mask_c.data_ptr<float>() : nullptr;

  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> acc(n);
    std::vector<float> t(n), e(n);
    std::vector<double> weights(n), row(d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const int16_t* qh = qp + bh * n * d;
      const int16_t* kh = kp + bh * n * d;
      const double* vh = vp + bh * n * d;
      for (int64_t i = 0; i < n; ++i) {
        qk_row(qh + i * d, kh, n, d, acc.data());
        for (int64_t j = 0; j < n; ++j) t[j] = static_cast<float>(acc[j]) * qk_scale_log2;
        if (bp) {
          const int64_t base = b * bias_f.stride(0) + h * bias_f.stride(1) + i * bias_f.stride(2);
          for (int64_t j = 0; j < n; ++j) t[j] = t[j] + bp[base + j * bias_f.stride(3)] * log2e;
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
        for (int64_t j = 0; j < n; ++j) {
          const float p = e[j] / sum;
          if (p_mode == kModeLog2) {
            const float ratio = std::max(p / p_param_f, ratio_floor);
            const int64_t code = std::clamp<int64_t>(pm::round_neg_log2(ratio), 0, levels);
            weights[j] = code <= shift ? std::ldexp(1.0, static_cast<int>(shift - code)) : 0.0;
          } else {
            float c = std::nearbyint(p / p_param_f) + p_zero_f;
            c = std::fmin(std::fmax(c, 0.0f), static_cast<float>(levels - 1));
            weights[j] = static_cast<double>(c) - static_cast<double>(p_zero);
          }
        }
        pv_row(weights.data(), vh, n, d, row.data());
        float* orow = op + (bh * n + i) * d;
        for (int64_t x = 0; x < d; ++x) {
          const float sumf = static_cast<float>(row[x]);
          orow[x] = p_mode == kModeLog2 ? (sumf * inv_two_s) * out_scale_log2 : sumf * pv_scale_linear;
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
