// dfqvit::native_layernorm_quant and dfqvit::native_quantize: one pass over a row instead of the ten PyTorch
// passes of kernels/reference.py, with the same fp32 operations in the same order (bit for bit; the row
// routine and its formulas are in layernorm.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "layernorm.h"
#include "quantize.h"

namespace dfqvit {
namespace {

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
  const LayerNormQuant ln{wp, bp, static_cast<float>(eps), g};
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> y(c);
    layernorm_quant_rows(ln, xp + begin * c, end - begin, c, op + begin * c, y.data(), isa);
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
