// Run-time ISA dispatch for the native CPU kernels (see cpu_isa.h).
#include "cpu_isa.h"
#include "portable_math.h"  // DFQVIT_X86

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

#if DFQVIT_X86
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace dfqvit {
namespace {

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512_vnni") return Isa::kAvx512Vnni;
  if (name == "amx_int8") return Isa::kAmxInt8;
  TORCH_CHECK(false, "dfqvit native: unknown ISA '", name, "'; allowed: auto, scalar, avx2, avx512_vnni, amx_int8.");
}

Isa checked(Isa wanted) {
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(detected_isa()), "dfqvit native: ISA ",
              isa_name(wanted), " requested but this CPU only runs up to ", isa_name(detected_isa()),
              "; unset DFQVIT_NATIVE_ISA or choose a lower one.");
  return wanted;
}

Isa initial_isa() {
  const char* env = std::getenv("DFQVIT_NATIVE_ISA");
  if (env == nullptr || std::string(env).empty() || std::string(env) == "auto") return detected_isa();
  return checked(parse_isa(env));
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

// AMX tiles and their int8 dot products (CPUID.7.0:EDX bits 24, 25), and the kernel's leave to use them: on Linux a
// process must ask for the 8 KB tile-data state once (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18)
// before its first tile instruction, or that instruction faults. The request covers every thread of the process.
[[maybe_unused]] bool amx_int8_usable() {  // called on x86-64 only
#if DFQVIT_X86 && defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = edx & (1u << 24), int8 = edx & (1u << 25);
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return tile && int8 && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace

Isa detected_isa() {
#if DFQVIT_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
      return amx_int8_usable() ? Isa::kAmxInt8 : Isa::kAvx512Vnni;
    if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return isa;
#else
  return Isa::kScalar;
#endif
}

Isa active_isa() { return static_cast<Isa>(active().load()); }

std::string set_isa(const std::string& name) {
  const std::string old = isa_name(active_isa());
  active().store(static_cast<int>(name == "auto" ? detected_isa() : checked(parse_isa(name))));
  return old;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmxInt8: return "amx_int8";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace dfqvit
