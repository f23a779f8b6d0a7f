// dfqvit._C: the native CPU backend. Importing the Python module (bindings.cpp) loads this shared library, whose
// static initialisers register the torch ops (torch.ops.dfqvit.native_*):
//   packing.cpp      native_pack_weight / native_unpack_weight
//   qgemm_cpu.cpp    native_qgemm       (int8 x packed int4/int3/int8 GEMM, fused epilogue; _prepacked on CPU
//                    panels; _prepacked_norm also LayerNorm-quantizes the fp32 output tiles: layernorm.h)
//   attention_cpu.cpp native_attention  (log2 / linear quantized softmax attention)
//   act_quant_cpu.cpp native_layernorm_quant / native_quantize
//   here             native_isa / native_set_isa (run-time ISA dispatch: avx512_vnni, avx2, scalar)
//   bindings.cpp     the Python module: direct entry points to the engine's per-call ops (no torch.ops boxing)
// dfqvit.kernels.native registers native_qgemm / native_attention as the CPU implementations of
// dfqvit::qgemm and dfqvit::attention_log2 / attention_linear.
#include <torch/library.h>

#include <string>

#include "cpu_isa.h"

namespace dfqvit {
namespace {

std::string native_isa() { return isa_name(active_isa()); }
std::string native_detected_isa() { return isa_name(detected_isa()); }
std::string native_set_isa(std::string name) { return set_isa(name); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(dfqvit, m) {
  m.def("native_isa() -> str", &native_isa);
  m.def("native_detected_isa() -> str", &native_detected_isa);
  m.def("native_set_isa(str name) -> str", &native_set_isa);
}

}  // namespace dfqvit
