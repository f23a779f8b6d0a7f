// dfqvit::native_layernorm_quant and dfqvit::native_quantize: one pass over a row instead of the ten PyTorch
// passes of kernels/reference.py, with the same fp32 operations in the same order (bit for bit):
//   mean = fp32(sum_j x_j in float64, index order) / C      (reference: portable_math.sequential_sum)
//   var  = fp32(sum_j (x_j - mean)^2 in float64, index order) / C
//   y    = (x - mean) * (1 / sqrt(var + eps)) * weight + bias
//   q    = clamp(round(y / scale) + zero, qmin, qmax) as int8         (reference.uniform_quantize)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "portable_math.h"

namespace dfqvit {
namespace {

struct Grid {
  float scale, zero, qmin, qmax;
};

inline int8_t quantize_scalar(float y, const Grid& g) {
  float q = std::nearbyint(y / g.scale) + g.zero;
  return static_cast<int8_t>(std::fmin(std::fmax(q, g.qmin), g.qmax));
}

#if DFQVIT_X86
// q[j] = quantize(y[j]) for j < n rounded down to 8; returns how many were done.
__attribute__((target("avx2"))) int64_t quantize_avx2(const float* y, int64_t n, const Grid& g, int8_t* q) {
  const __m256 scale = _mm256_set1_ps(g.scale), zero = _mm256_set1_ps(g.zero);
  const __m256 lo = _mm256_set1_ps(g.qmin), hi = _mm256_set1_ps(g.qmax);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(y + j), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, zero), lo), hi);
    const __m256i vi = _mm256_cvtps_epi32(v);
    const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(vi), _mm256_extracti128_si256(vi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + j), _mm_packs_epi16(p16, p16));
  }
  return j;
}

// y[j] = ((x[j] - mean) * rstd) * w[j] + b[j] for j < n rounded down to 8.
__attribute__((target("avx2"))) int64_t normalize_avx2(const float* x, int64_t n, float mean, float rstd,
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
#endif

void quantize_row(const float* y, int64_t n, const Grid& g, int8_t* q, Isa isa) {
  int64_t j = 0;
#if DFQVIT_X86
  if (isa != Isa::kScalar) j = quantize_avx2(y, n, g, q);
#endif
  for (; j < n; ++j) q[j] = quantize_scalar(y[j], g);
}

Grid make_grid(double scale, int64_t zero, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(scale > 0 && qmin <= qmax && qmin >= -128 && qmax <= 127,
              "dfqvit native quantize: scale=", scale, " must be > 0 and -128 <= qmin=", qmin, " <= qmax=", qmax,
              " <= 127.");
  return Grid{static_cast<float>(scale), static_cast<float>(zero), static_cast<float>(qmin), static_cast<float>(qmax)};
}

at::Tensor native_layernorm_quant(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, double eps,
                                  double out_scale, int64_t out_zero, int64_t out_qmin, int64_t out_qmax) {
  TORCH_CHECK(x_in.dim() >= 1 && weight.dim() == 1 && bias.dim() == 1 && weight.size(0) == x_in.size(-1) &&
                  bias.size(0) == x_in.size(-1),
              "dfqvit native layernorm_quant: x (..., C) with weight and bias (C,), got ", x_in.sizes(), ", ",
              weight.sizes(), ", ", bias.sizes());
  const Grid g = make_grid(out_scale, out_zero, out_qmin, out_qmax);
  const Isa isa = active_isa();
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  const int64_t c = x.size(-1), rows = c ? x.numel() / c : 0;
  at::Tensor out = at::empty(x_in.sizes(), at::kChar);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  int8_t* op = out.data_ptr<int8_t>();
  const float cf = static_cast<float>(c), epsf = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> y(c);
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * c;
      double acc = 0.0;
      for (int64_t j = 0; j < c; ++j) acc += static_cast<double>(xr[j]);
      const float mean = static_cast<float>(acc) / cf;
      double acc2 = 0.0;
      for (int64_t j = 0; j < c; ++j) {
        const float centered = xr[j] - mean;
        acc2 += static_cast<double>(centered * centered);
      }
      const float var = static_cast<float>(acc2) / cf;
      const float rstd = 1.0f / std::sqrt(var + epsf);
      int64_t j = 0;
#if DFQVIT_X86
      if (isa != Isa::kScalar) j = normalize_avx2(xr, c, mean, rstd, wp, bp, y.data());
#endif
      for (; j < c; ++j) y[j] = (xr[j] - mean) * rstd * wp[j] + bp[j];
      quantize_row(y.data(), c, g, op + r * c, isa);
    }
  });
  return out;
}

at::Tensor native_quantize(const at::Tensor& x_in, double scale, int64_t zero, int64_t qmin, int64_t qmax) {
  const Grid g = make_grid(scale, zero, qmin, qmax);
  const Isa isa = active_isa();
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(x_in.sizes(), at::kChar);
  const float* xp = x.data_ptr<float>();
  int8_t* op = out.data_ptr<int8_t>();
  const int64_t n = x.numel(), chunk = 1 << 14;
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t start = i * chunk;
      quantize_row(xp + start, std::min(chunk, n - start), g, op + start, isa);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dfqvit, m) {
  m.def("native_layernorm_quant(Tensor x, Tensor weight, Tensor bias, float eps, float out_scale, int out_zero, "
        "int out_qmin, int out_qmax) -> Tensor");
  m.def("native_quantize(Tensor x, float scale, int zero, int qmin, int qmax) -> Tensor");
}

TORCH_LIBRARY_IMPL(dfqvit, CPU, m) {
  m.impl("native_layernorm_quant", &native_layernorm_quant);
  m.impl("native_quantize", &native_quantize);
}

}  // namespace dfqvit
