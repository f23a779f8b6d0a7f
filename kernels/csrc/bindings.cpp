// dfqvit._C as a Python module: the native backend's per-call entry points (dfqvit.kernels.native), bound with
// pybind11 to the registered ops (torch.ops.dfqvit.native_*) through their typed dispatcher handles. Same
// kernels, same bits; what goes is the cost of reaching them: a torch.ops call runs two Python frames and boxes
// every argument into an IValue stack, ~11 us a call on the 2-core Zen 3 VM (a GEMM at M = 1: 18.6 us through
// torch.ops, 7.4 us here, F.linear 8.3 us) -- a tenth of a batch-8 CIFAR proj GEMM, and the engine makes
// about 70 such calls per forward. The GIL is released while a kernel runs, as torch.ops does.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace dfqvit {
namespace {

using OptTensor = c10::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using QgemmSig = at::Tensor(const at::Tensor&, double, int64_t, const at::Tensor&, int64_t, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t, int64_t,
                            bool, c10::optional<double>, int64_t, int64_t, int64_t, at::ScalarType, const OptTensor&);

at::Tensor qgemm_prepacked(const at::Tensor& a, double a_scale, int64_t a_zero, const at::Tensor& panels, int64_t n,
                           const at::Tensor& w_scale, const at::Tensor& w_zero, const at::Tensor& w_col_sums,
                           const OptTensor& bias, const OptTensor& residual, int64_t storage_bits, int64_t k, bool gelu,
                           c10::optional<double> out_scale, int64_t out_zero, int64_t out_qmin, int64_t out_qmax,
                           at::ScalarType out_dtype, const OptTensor& out_grid) {
  static const auto op = op_handle<QgemmSig>("dfqvit::native_qgemm_prepacked");
  return op.call(a, a_scale, a_zero, panels, n, w_scale, w_zero, w_col_sums, bias, residual, storage_bits, k, gelu,
                 out_scale, out_zero, out_qmin, out_qmax, out_dtype, out_grid);
}

using QgemmNormSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, double, int64_t, const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, const at::Tensor&, const at::Tensor&,
    double, double, int64_t, int64_t, int64_t);

std::tuple<at::Tensor, at::Tensor> qgemm_prepacked_norm(
    const at::Tensor& a, double a_scale, int64_t a_zero, const at::Tensor& panels, int64_t n, const at::Tensor& w_scale,
    const at::Tensor& w_zero, const at::Tensor& w_col_sums, const OptTensor& bias, const OptTensor& residual,
    int64_t storage_bits, int64_t k, const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
    double scale, int64_t zero, int64_t qmin, int64_t qmax) {
  static const auto op = op_handle<QgemmNormSig>("dfqvit::native_qgemm_prepacked_norm");
  return op.call(a, a_scale, a_zero, panels, n, w_scale, w_zero, w_col_sums, bias, residual, storage_bits, k,
                 norm_weight, norm_bias, eps, scale, zero, qmin, qmax);
}

using AttentionSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, double,
                                int64_t, double, int64_t, double, const OptTensor&, const OptTensor&, int64_t, double,
                                int64_t, int64_t, at::ScalarType, c10::optional<double>, int64_t, int64_t, int64_t,
                                bool);

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double q_scale, int64_t q_zero,
                     double k_scale, int64_t k_zero, double v_scale, int64_t v_zero, double sm_scale,
                     const OptTensor& bias, const OptTensor& mask, int64_t p_mode, double p_param, int64_t p_zero,
                     int64_t p_bits, at::ScalarType out_dtype, c10::optional<double> out_scale, int64_t out_zero,
                     int64_t out_qmin, int64_t out_qmax, bool token_major) {
  static const auto op = op_handle<AttentionSig>("dfqvit::native_attention");
  return op.call(q, k, v, q_scale, q_zero, k_scale, k_zero, v_scale, v_zero, sm_scale, bias, mask, p_mode, p_param,
                 p_zero, p_bits, out_dtype, out_scale, out_zero, out_qmin, out_qmax, token_major);
}

using LayernormQuantSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, int64_t,
                                     int64_t, int64_t);

at::Tensor layernorm_quant(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                           double scale, int64_t zero, int64_t qmin, int64_t qmax) {
  static const auto op = op_handle<LayernormQuantSig>("dfqvit::native_layernorm_quant");
  return op.call(x, weight, bias, eps, scale, zero, qmin, qmax);
}

using QuantizeSig = at::Tensor(const at::Tensor&, double, int64_t, int64_t, int64_t);

at::Tensor quantize(const at::Tensor& x, double scale, int64_t zero, int64_t qmin, int64_t qmax) {
  static const auto op = op_handle<QuantizeSig>("dfqvit::native_quantize");
  return op.call(x, scale, zero, qmin, qmax);
}

}  // namespace
}  // namespace dfqvit

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  using py::arg;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "dfqvit native CPU ops (torch.ops.dfqvit.native_*), and direct entry points for dfqvit.kernels.native";
  m.def("qgemm_prepacked", &dfqvit::qgemm_prepacked, no_gil, arg("a"), arg("a_scale"), arg("a_zero"), arg("panels"),
        arg("n"), arg("w_scale"), arg("w_zero"), arg("w_col_sums"), arg("bias").none(true),
        arg("residual").none(true), arg("storage_bits"), arg("k"), arg("gelu"), arg("out_scale").none(true),
        arg("out_zero"), arg("out_qmin"), arg("out_qmax"), arg("out_dtype"), arg("out_grid").none(true));
  m.def("qgemm_prepacked_norm", &dfqvit::qgemm_prepacked_norm, no_gil, arg("a"), arg("a_scale"), arg("a_zero"),
        arg("panels"), arg("n"), arg("w_scale"), arg("w_zero"), arg("w_col_sums"), arg("bias").none(true),
        arg("residual").none(true), arg("storage_bits"), arg("k"), arg("norm_weight"), arg("norm_bias"), arg("eps"),
        arg("scale"), arg("zero"), arg("qmin"), arg("qmax"));
  m.def("attention", &dfqvit::attention, no_gil, arg("q"), arg("k"), arg("v"), arg("q_scale"), arg("q_zero"),
        arg("k_scale"), arg("k_zero"), arg("v_scale"), arg("v_zero"), arg("sm_scale"), arg("bias").none(true),
        arg("mask").none(true), arg("p_mode"), arg("p_param"), arg("p_zero"), arg("p_bits"), arg("out_dtype"),
        arg("out_scale").none(true), arg("out_zero"), arg("out_qmin"), arg("out_qmax"), arg("token_major"));
  m.def("layernorm_quant", &dfqvit::layernorm_quant, no_gil, arg("x"), arg("weight"), arg("bias"), arg("eps"),
        arg("scale"), arg("zero"), arg("qmin"), arg("qmax"));
  m.def("quantize", &dfqvit::quantize, no_gil, arg("x"), arg("scale"), arg("zero"), arg("qmin"), arg("qmax"));
}
