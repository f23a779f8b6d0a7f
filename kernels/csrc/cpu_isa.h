// Which vector instruction set the native CPU kernels use: detected once at run time, overridable for tests
// and benchmarks (torch.ops.dfqvit.native_set_isa / the DFQVIT_NATIVE_ISA environment variable).
#pragma once

#include <string>

namespace dfqvit {

// Each rung includes the ones below it (AMX-INT8 CPUs all have AVX-512 VNNI).
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmxInt8 = 3 };

// The best ISA this CPU runs.
Isa detected_isa();
// The ISA the kernels use now: DFQVIT_NATIVE_ISA if set (capped by error at what the CPU runs), else detected.
Isa active_isa();
// Force an ISA ("scalar", "avx2", "avx512_vnni", "amx_int8", or "auto"); throws if the CPU lacks it. Returns the old one.
std::string set_isa(const std::string& name);
const char* isa_name(Isa isa);
// The rung's kernels may use AVX-512 (F, BW, VNNI): VNNI and AMX-INT8.
inline bool has_avx512(Isa isa) { return isa >= Isa::kAvx512Vnni; }

}  // namespace dfqvit
