// dfqvit::native_qgemm / native_qgemm_prepacked: int8 activations x packed int4 / int3 (or int8) weights on
// the CPU, exact int32 accumulation, the fused epilogue of kernels/qgemm.py (scale, bias, GELU, residual,
// re-quantize), bit for bit equal to kernels/reference.py:qgemm_reference.
//
// Weights live in CPU panels (native_prepack_weight, once when the engine is built; same bytes as the GPU
// layout, K padded to 4 instead of to the packing group):
//   int4 / int3 ("nibble panels"): 16 outputs per panel, 32 bytes per quad of K positions; byte c*4 + t
//       holds W[16p + c, 4q + t] in the low nibble and W[16p + c + 8, 4q + t] in the high nibble. One AND
//       gives the u8 x s8 operand for outputs 0..7, one shift + AND for outputs 8..15 (4 codes per 32-bit lane).
//       int3 codes are stored in nibbles too (0.5 byte per weight on the CPU).
//   int8: 16 outputs per panel, 32 bytes per pair of K positions: byte c*2 + t = W[16p + c, 2q + t].
// Codes are stored raw (not minus the zero point); the zero points enter through sums:
//   nibble, scalar:          sum (a - az)(W - wz) = sum (a + 128) W - wz[n] * sum_k (a + 128) - (128 + az) * colsum[n]
//   nibble, AVX2 / VNNI / AMX: sum (a - az)(W - wz) = sum a W       - wz[n] * sum_k a         - az * colsum[n]
//   int8, VNNI:              sum (a - az)(W - wz) = sum a (W + 128) - (wz[n] + 128) * sum_k a - az * colsum[n]
//   int8, AMX:               as the AVX2 nibbles (s8 x s8)
//   int8, AVX2 / scalar:     sum (a - az)(W - wz) = sum (a - az) W  - wz[n] * sum_k (a - az)
// (colsum[n] = sum_k (W - wz).) Micro-kernels compute rows x 16 outputs of int32 sums:
//   AVX2 (4 rows): the panels unpacked to u8 planes of the codes (once per call, or per row tile for large
//         weights), vpmaddubsw of codes (u8) x activations (s8, read in place when K is a multiple of 4) -> s16
//         pairs; eight of them stay within 2**15, then vpmaddwd with ones -> s32. int8 weights: sign-extend to
//         s16, vpmaddwd;
//   AVX-512 VNNI: the same u8 planes (int8 weights: regrouped to quads, + 128), vpdpbusd of planes (u8)
//         x activations (s8, broadcast from memory by the instruction) -> s32, 12 rows per call;
//   AMX-INT8 (a 48-row tile): the same planes (int8 weights regrouped, s8) as B tiles, TDPBSUD / TDPBSSD;
//   scalar: the same sums in plain C++.
// Output tiles run in parallel on torch's OpenMP pool (at::parallel_for, torch.set_num_threads); the epilogue
// runs on the accumulators right after each micro-kernel, in the reference's fp32 order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "cpu_isa.h"
#include "layernorm.h"
#include "packing.h"
#include "parallel.h"
#include "portable_math.h"
#include "quantize.h"

namespace dfqvit {
namespace {

constexpr int kNR = 16;          // outputs per panel
constexpr int kMR = 4;           // rows per micro-kernel call
constexpr int kStepBytes = 32;   // bytes per panel step (a quad of K for nibbles, a pair for int8)
constexpr int64_t kTileRows = 48;
// AMX tiles (amx.h): 16 rows of 64 bytes, 16 quads of K per B tile.
constexpr int kAmxChunkQuads = kAmxBytes / 4;
// Unpacked weights up to this size are unpacked once per GEMM call instead of once per row tile. A/B on the 2-core
// Zen 3 VM: the CIFAR layer shapes (planes 37-147 KB) 4-17% faster (M 520 and 4160, every epilogue), the DeiT-S ones
// (147-590 KB, read back from L2/L3 by each tile) ~4% on average. Larger weights keep the per-tile unpack: their
// planes would be streamed from memory by every tile.
constexpr int64_t kPlanesOnceBytes = int64_t(1) << 20;
// AMX computes a panel's 48-row tile in about the time AVX2 takes to unpack it, so its planes are unpacked once up
// to this size. A/B in one process on the Xeon with AMX (planes above 1 MB: ViT-B shapes): fc1 / fc2 at M 1576
// 1.17x / 1.16x, qkv at M 197 1.27x, fc1 at M 12608 1.31x; fc2 at M 197 0.92x.
constexpr int64_t kPlanesOnceBytesAmx = int64_t(64) << 20;
// VNNI unpacks larger weights once per call too when there are at least this many rows. In-process A/B on the
// 2-core Zen 5 VM, ViT-B shapes (planes 1.8-2.4 MB), once per call against once per row tile: M 1576 and 12608
// 1.03-1.13x; M 788 0.98-1.12x; M 394 0.92-1.02x; M 197 0.77-1.08x.
constexpr int64_t kPlanesOnceRowsVnni = 1024;
// Largest per-thread staging block of a residual GEMM's fp32 output tile (run_tiles): N up to 1365.
constexpr int64_t kStagingBytes = int64_t(256) << 10;

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }
int64_t lane_k(int64_t storage_bits) { return storage_bits == 8 ? 2 : 4; }
int64_t panel_steps(int64_t k, int64_t storage_bits) { return (k + lane_k(storage_bits) - 1) / lane_k(storage_bits); }

// ---------------------------------------------------------------------------------------------------
// Epilogue
// ---------------------------------------------------------------------------------------------------

// A LayerNorm + quantize of the fp32 output rows, and where its codes go.
struct NormOutput {
  LayerNormQuant ln;
  int8_t* codes;  // (M, N)
};

struct Epilogue {
  const float* row_scale;     // (Np) a_scale * w_scale
  const int32_t* col_term;    // (Np) subtracted from every accumulator of the column
  const int32_t* w_zero;      // (Np) times row_sums[m], subtracted too
  const int32_t* row_sums;    // (M)  sum_k of the activations as the micro-kernel read them
  const float* bias;          // (Np) or nullptr
  bool gelu;
  const float* residual;      // (M, ld_residual) fp32 or nullptr
  int64_t ld_residual;
  bool requant;
  const float* out_scale;     // (Np) per-column re-quantization grid (a per-tensor grid is repeated)
  const float* out_zero;
  const float* out_qmin;
  const float* out_qmax;
  float* out_f32;             // (M, N) when !requant
  int8_t* out_i8;             // (M, N) when requant
  int64_t n;                  // true N (row stride of the output)
  // With norm: each finished row tile of the fp32 output (residual added) is also LayerNorm-quantized while it
  // is in cache (native_qgemm_prepacked_norm).
  const NormOutput* norm = nullptr;
  // The ISA has AVX-512 (the VNNI and AMX rungs): the epilogue on 16 lanes (epilogue_avx512_impl; in-process A/B
  // on the 2-core Zen 5 VM, CIFAR and DeiT-S layer shapes: the GEMM 1.01-1.07x with fp32 out, 1.06-1.19x with int8
  // out, GELU included), GELU too (pm::gelu16::gelu_inplace; A/B on the 2-core Xeon, fc1 with bias + GELU + int8
  // out: AMX 1.15-1.23x the GEMM, VNNI 1.03-1.04x).
  bool avx512 = false;
};

inline void store_scalar(const Epilogue& ep, int32_t acc, int64_t m, int64_t col) {
  const int32_t exact = acc - ep.w_zero[col] * ep.row_sums[m] - ep.col_term[col];
  float y = static_cast<float>(exact) * ep.row_scale[col];
  if (ep.bias) y = y + ep.bias[col];
  if (ep.gelu) y = pm::gelu(y);
  if (ep.residual) y = y + ep.residual[m * ep.ld_residual + col];
  if (ep.requant) {
    const Grid grid{ep.out_scale[col], ep.out_zero[col], ep.out_qmin[col], ep.out_qmax[col]};
    ep.out_i8[m * ep.n + col] = quantize_scalar(y, grid);
  } else {
    ep.out_f32[m * ep.n + col] = y;
  }
}

// Rows [m, m + rows) x columns [col0, col0 + width) of accumulators acc[r * kNR + c].
void epilogue_scalar(const Epilogue& ep, const int32_t* acc, int64_t m, int rows, int64_t col0, int width) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < width; ++c) store_scalar(ep, acc[r * kNR + c], m + r, col0 + c);
}

#if DFQVIT_X86
// The epilogue's vector operations at two widths: 8 lanes (AVX2) and 16 (AVX-512: one panel row per vector), the
// fp32 ones from pm::F32x8 / F32x16. The same operations per lane, so the same bits. The body that uses them is
// written once (epilogue_block.inc) and compiled once per width with that width's target; they are inlined there
// (no calls remain in the binary). The AVX2 instantiation has no AVX-512 code.
struct Lanes8 : pm::F32x8 {
  using I = __m256i;
#define DFQVIT_L8 __attribute__((target("avx2"))) static inline
  DFQVIT_L8 I load_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  DFQVIT_L8 F pre_activation(I acc, I w_zero, int32_t row_sum, I col_term, F scale) {
    const I exact = _mm256_sub_epi32(_mm256_sub_epi32(acc, _mm256_mullo_epi32(w_zero, _mm256_set1_epi32(row_sum))),
                                     col_term);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(exact), scale);
  }
  DFQVIT_L8 void quantize(F y, F scale, F zero, F qmin, F qmax, int8_t* q) {
    quantize8_avx2(y, scale, zero, qmin, qmax, q);
  }
#undef DFQVIT_L8
};

struct Lanes16 : pm::F32x16 {
  using I = __m512i;
#define DFQVIT_L16 __attribute__((target("avx512f"))) static inline
  DFQVIT_L16 I load_i(const int32_t* p) { return _mm512_loadu_si512(p); }
  DFQVIT_L16 F pre_activation(I acc, I w_zero, int32_t row_sum, I col_term, F scale) {
    const I exact = _mm512_sub_epi32(_mm512_sub_epi32(acc, _mm512_mullo_epi32(w_zero, _mm512_set1_epi32(row_sum))),
                                     col_term);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(exact), scale);
  }
  // quantize8_avx2 on 16 lanes: vrndscaleps to nearest even, then vpmovsdb (values already within [-128, 127]).
  DFQVIT_L16 void quantize(F y, F scale, F zero, F qmin, F qmax, int8_t* q) {
    F v = _mm512_roundscale_ps(_mm512_div_ps(y, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, zero), qmin), qmax);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
#undef DFQVIT_L16
};

namespace epilogue8 {
using L = Lanes8;
#define DFQVIT_EPILOGUE_TARGET __attribute__((target("avx2")))
#include "epilogue_block.inc"
#undef DFQVIT_EPILOGUE_TARGET
}  // namespace epilogue8

namespace epilogue16 {
using L = Lanes16;
#define DFQVIT_EPILOGUE_TARGET __attribute__((target("avx2,avx512f,avx512bw")))
#include "epilogue_block.inc"
#undef DFQVIT_EPILOGUE_TARGET
}  // namespace epilogue16

template <bool kBias, bool kGelu, bool kResidual, bool kRequant>
__attribute__((target("avx2"))) void epilogue_avx2_impl(const Epilogue& ep, const int32_t* acc, int64_t m, int rows,
                                                        int64_t col0, int width) {
  epilogue8::epilogue_block<kBias, kGelu, kResidual, kRequant>(ep, acc, m, rows, col0, width);
}

// AVX-512 CPUs (the VNNI and AMX rungs): a whole panel row per vector; a narrower last panel on 8 lanes.
template <bool kBias, bool kGelu, bool kResidual, bool kRequant>
__attribute__((target("avx2,avx512f,avx512bw"))) void epilogue_avx512_impl(const Epilogue& ep, const int32_t* acc,
                                                                           int64_t m, int rows, int64_t col0,
                                                                           int width) {
  if (width == kNR)
    return epilogue16::epilogue_block<kBias, kGelu, kResidual, kRequant>(ep, acc, m, rows, col0, width);
  epilogue8::epilogue_block<kBias, kGelu, kResidual, kRequant>(ep, acc, m, rows, col0, width);
}

using EpilogueFn = void (*)(const Epilogue&, const int32_t*, int64_t, int, int64_t, int);

template <bool kBias, bool kGelu, bool kResidual>
EpilogueFn pick_requant(bool requant, bool wide) {
  if (wide)
    return requant ? &epilogue_avx512_impl<kBias, kGelu, kResidual, true>
                   : &epilogue_avx512_impl<kBias, kGelu, kResidual, false>;
  return requant ? &epilogue_avx2_impl<kBias, kGelu, kResidual, true>
                 : &epilogue_avx2_impl<kBias, kGelu, kResidual, false>;
}

template <bool kBias, bool kGelu>
EpilogueFn pick_residual(bool residual, bool requant, bool wide) {
  return residual ? pick_requant<kBias, kGelu, true>(requant, wide)
                  : pick_requant<kBias, kGelu, false>(requant, wide);
}

template <bool kBias>
EpilogueFn pick_gelu(bool gelu, bool residual, bool requant, bool wide) {
  return gelu ? pick_residual<kBias, true>(residual, requant, wide)
              : pick_residual<kBias, false>(residual, requant, wide);
}

// The vector epilogue for ep: 16 lanes where the CPU has AVX-512 (ep.avx512), else 8.
EpilogueFn epilogue_vector_for(const Epilogue& ep) {
  const bool residual = ep.residual != nullptr;
  return ep.bias ? pick_gelu<true>(ep.gelu, residual, ep.requant, ep.avx512)
                 : pick_gelu<false>(ep.gelu, residual, ep.requant, ep.avx512);
}
#endif

// ---------------------------------------------------------------------------------------------------
// Micro-kernels: acc[r * kNR + c] = sum over the panel of a_row_r . panel_column_c (rows <= kMR)
// ---------------------------------------------------------------------------------------------------

void micro_nibble_scalar(const uint8_t* a, int64_t lda, int rows, const uint8_t* panel, int64_t quads,
                         int32_t* acc) {
  for (int r = 0; r < rows; ++r) {
    int32_t sums[kNR] = {0};
    const uint8_t* ar = a + r * lda;
    for (int64_t q = 0; q < quads; ++q) {
      const uint8_t* w = panel + q * kStepBytes;
      for (int c = 0; c < 8; ++c)
        for (int t = 0; t < 4; ++t) {
          const int32_t x = ar[4 * q + t];
          sums[c] += x * int32_t(w[4 * c + t] & 0xF);
          sums[c + 8] += x * int32_t(w[4 * c + t] >> 4);
        }
    }
    std::memcpy(acc + r * kNR, sums, sizeof sums);
  }
}

void micro_int8_scalar(const int16_t* a, int64_t lda, int rows, const int8_t* panel, int64_t pairs, int32_t* acc) {
  for (int r = 0; r < rows; ++r) {
    int32_t sums[kNR] = {0};
    const int16_t* ar = a + r * lda;
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t* w = panel + p * kStepBytes;
      for (int c = 0; c < kNR; ++c)
        for (int t = 0; t < 2; ++t) sums[c] += int32_t(ar[2 * p + t]) * int32_t(w[2 * c + t]);
    }
    std::memcpy(acc + r * kNR, sums, sizeof sums);
  }
}

#if DFQVIT_X86
inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int MR>
__attribute__((target("avx2"))) void micro_int8_avx2(const int16_t* a, int64_t lda, const int8_t* panel,
                                                     int64_t pairs, int32_t* acc) {
  __m256i lo_sum[MR], hi_sum[MR];
  for (int r = 0; r < MR; ++r) lo_sum[r] = hi_sum[r] = _mm256_setzero_si256();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * kStepBytes));
    const __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(x));
    const __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(x, 1));
    for (int r = 0; r < MR; ++r) {
      const __m256i b = _mm256_set1_epi32(load_i32(a + r * lda + 2 * p));
      lo_sum[r] = _mm256_add_epi32(lo_sum[r], _mm256_madd_epi16(b, lo));
      hi_sum[r] = _mm256_add_epi32(hi_sum[r], _mm256_madd_epi16(b, hi));
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kNR), lo_sum[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kNR + 8), hi_sum[r]);
  }
}

// AVX2 nibble path: the panels are unpacked (unpack_panel_avx2; once per call, or once per row tile for large
// weights: kPlanesOnceBytes) into u8 planes of the codes, 64 bytes per quad (low nibbles = outputs 0..7, then
// high = 8..15), read by every row of a tile.
__attribute__((target("avx2"))) void unpack_panel_avx2(const uint8_t* panel, int64_t quads, uint8_t* out) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t q = 0; q < quads; ++q) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * kStepBytes));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q * 64), _mm256_and_si256(x, nibble));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q * 64 + 32),
                        _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble));
  }
}

// sum_k codes x activations for MR rows x 16 outputs: vpmaddubsw takes the codes as its unsigned operand and the
// activations (s8, as they are) as the signed one. Each s16 lane of one vpmaddubsw is two products, in
// [-2 * 128 * 15, 2 * 127 * 15]; eight quads sum to at most 30720 in magnitude (exact in s16), then one vpmaddwd
// with ones widens the group to int32. Loop order: per quad the plane's two vectors are loaded once and used by
// all MR rows (one 4-byte broadcast per row); the s16 sums of the group stay in registers (2 * MR), the int32
// sums live in acc.
// Measured against the earlier forms (in-process A/B, CIFAR layer shapes at M 520 and 4160, fp32 and int8 out):
// row-outer with the plane reloaded per row (3 loads per 2 vpmaddubsw; this CPU loads two 256-bit vectors per
// cycle) was 5-12% slower; then a + 128 (u8) x s8 planes of W - wz, whose products bound the group to four
// quads (2 * 255 * 15 per lane) and which needed a copy of the activations, was 4-11% slower than this form
// even though this one brings back the epilogue's wz[n] * row-sum term.
template <int MR>
__attribute__((target("avx2"))) void micro_codes_avx2(const int8_t* a, int64_t lda, const uint8_t* planes,
                                                      int64_t quads, int32_t* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kNR), _mm256_setzero_si256());
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kNR + 8), _mm256_setzero_si256());
  }
  for (int64_t q = 0; q < quads; q += 8) {
    const int group = static_cast<int>(std::min<int64_t>(8, quads - q));
    __m256i lo[MR], hi[MR];
    for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int t = 0; t < group; ++t) {
      const uint8_t* wq = planes + (q + t) * 64;
      const __m256i wl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq));
      const __m256i wh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32));
      for (int r = 0; r < MR; ++r) {
        const __m256i b = _mm256_set1_epi32(load_i32(a + r * lda + 4 * (q + t)));
        lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(wl, b));
        hi[r] = _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(wh, b));
      }
    }
    for (int r = 0; r < MR; ++r) {
      __m256i* pl = reinterpret_cast<__m256i*>(acc + r * kNR);
      __m256i* ph = reinterpret_cast<__m256i*>(acc + r * kNR + 8);
      _mm256_storeu_si256(pl, _mm256_add_epi32(_mm256_loadu_si256(pl), _mm256_madd_epi16(lo[r], ones)));
      _mm256_storeu_si256(ph, _mm256_add_epi32(_mm256_loadu_si256(ph), _mm256_madd_epi16(hi[r], ones)));
    }
  }
}

// acc += vpdpbusd(w, the 4 bytes at a broadcast to every lane). Written out: around the intrinsic GCC 12 copied
// every accumulator twice per iteration (16 register moves per 8 vpdpbusd) and did not fold the broadcast.
// always_inline: Clang 14 called it (an asm statement counts as expensive to its inliner).
__attribute__((target("avx512f,avx512vnni"), always_inline)) inline __m512i dpbusd_broadcast(__m512i acc, __m512i w,
                                                                                              const int8_t* a) {
  asm("vpdpbusd %1%{1to16%}, %2, %0" : "+v"(acc) : "m"(*reinterpret_cast<const int32_t*>(a)), "v"(w));
  return acc;
}

// Row r's accumulator s<r>, when the kernel has that many rows. Named variables, not an array: the asm's memory
// operand may alias an array of __m512i (a may_alias type), so GCC stored the whole array before every vpdpbusd.
#define DFQVIT_VNNI_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define DFQVIT_VNNI_ZERO(r) __m512i s##r = _mm512_setzero_si512();
#define DFQVIT_VNNI_DOT(r) if constexpr (MR > r) s##r = dpbusd_broadcast(s##r, w, a + r * lda + 4 * q);
#define DFQVIT_VNNI_STORE(r) if constexpr (MR > r) _mm512_storeu_si512(acc + r * kNR, s##r);

// AVX-512 VNNI: the planes as the unsigned operand of vpdpbusd (nibble codes, or int8 weights + 128: u8), each
// row's quad of activations (s8, as they are, read in place like AVX2's) as the signed one, broadcast from memory
// by the instruction itself ({1to16}). Per quad: one 64-byte plane load, then one vpdpbusd per row (4 products
// per lane, exact in int32: |sum| <= 255 * 128 * K). MR (<= 16) rows share each plane load.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void micro_planes_vnni(const int8_t* a, int64_t lda,
                                                                              const uint8_t* planes, int64_t quads,
                                                                              int32_t* acc) {
  static_assert(MR >= 1 && MR <= 16, "16 accumulators at most");
  DFQVIT_VNNI_ROWS(DFQVIT_VNNI_ZERO)
  for (int64_t q = 0; q < quads; ++q) {
    const __m512i w = _mm512_loadu_si512(planes + q * 64);
    DFQVIT_VNNI_ROWS(DFQVIT_VNNI_DOT)
  }
  DFQVIT_VNNI_ROWS(DFQVIT_VNNI_STORE)
}
#undef DFQVIT_VNNI_ROWS
#undef DFQVIT_VNNI_ZERO
#undef DFQVIT_VNNI_DOT
#undef DFQVIT_VNNI_STORE

// Rows per VNNI micro-kernel call. In-process A/B on the 2-core Zen 5 VM (DeiT-S b8 and CIFAR shapes, W4A8 and
// W8A8), speed relative to 12 rows: 8 rows 0.96-1.01x, 4 rows 0.65-0.86x, 16 rows 0.86-0.93x.
constexpr int kVnniMR = 12;

// rows (<= MR) rows of a at once.
template <int MR = kVnniMR>
void micro_planes_vnni_rows(const int8_t* a, int64_t lda, int rows, const uint8_t* planes, int64_t quads,
                            int32_t* acc) {
  if (rows == MR) return micro_planes_vnni<MR>(a, lda, planes, quads, acc);
  if constexpr (MR > 1) micro_planes_vnni_rows<MR - 1>(a, lda, rows, planes, quads, acc);
}

// AMX-INT8 nibble path (Sapphire Rapids and later). Every tile is 16 rows x 64 bytes: C tiles 0..2 (int32 sums of
// 16 rows x 16 outputs), A tiles 3..5 (16 activation rows x 64 K positions, s8 as they are), B tile 6 (16 quads of
// one panel's u8 planes: unpack_panel_avx2 already writes them in the VNNI layout a B tile wants, 4 consecutive K
// positions per output). One call covers a whole row tile (up to kTileRows = 48 rows: G row groups of 16) of one
// panel; per 64 K positions one B load feeds G TDPBSUD (s8 x u8, 16 x 16 x 64 products each). The activations are
// read in place when K is a multiple of 64 (a last row tile ending inside a 16-row group from a zero-padded copy),
// else copied with K padded to a multiple of 64 and rows to 16 (zeros); the planes are padded to 16 quads (zeros):
// every tile load is whole, and rows past M give sums nobody reads. Same sums as micro_codes_avx2, so the same epilogue.
// (Tile numbers: C 0-2, A 3-5, B 6.)
// C tile += A tile (s8) . B tile 6 (u8 codes, or s8 int8 weights). A macro: GCC's tile intrinsics paste the tile
// numbers into the assembly text, so they must be literals.
#define DFQVIT_AMX_DOT(c_tile, a_tile) \
  do {                                 \
    if constexpr (kSigned)             \
      _tile_dpbssd(c_tile, a_tile, 6); \
    else                               \
      _tile_dpbsud(c_tile, a_tile, 6); \
  } while (0)

// kSigned: int8 weights (s8 x s8, TDPBSSD) instead of nibble codes (s8 x u8, TDPBSUD).
template <int G, bool kSigned>
__attribute__((target("amx-tile,amx-int8"))) void micro_codes_amx(const int8_t* a, int64_t lda,
                                                                  const uint8_t* planes, int64_t chunks,
                                                                  int32_t* acc) {
  static_assert(G >= 1 && G * kAmxRows <= kTileRows, "three row groups at most");
  _tile_zero(0);
  if constexpr (G > 1) _tile_zero(1);
  if constexpr (G > 2) _tile_zero(2);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(6, planes + c * kAmxChunkQuads * 64, 64);
    _tile_loadd(3, a + c * kAmxBytes, lda);
    DFQVIT_AMX_DOT(0, 3);
    if constexpr (G > 1) {
      _tile_loadd(4, a + kAmxRows * lda + c * kAmxBytes, lda);
      DFQVIT_AMX_DOT(1, 4);
    }
    if constexpr (G > 2) {
      _tile_loadd(5, a + 2 * kAmxRows * lda + c * kAmxBytes, lda);
      DFQVIT_AMX_DOT(2, 5);
    }
  }
  constexpr int64_t stride = kNR * sizeof(int32_t);
  _tile_stored(0, acc, stride);
  if constexpr (G > 1) _tile_stored(1, acc + kAmxRows * kNR, stride);
  if constexpr (G > 2) _tile_stored(2, acc + 2 * kAmxRows * kNR, stride);
}

// rows (<= kTileRows) activation rows from a, in row groups of 16.
template <bool kSigned>
void micro_codes_amx_rows(const int8_t* a, int64_t lda, int rows, const uint8_t* planes, int64_t chunks,
                          int32_t* acc) {
  switch ((rows + kAmxRows - 1) / kAmxRows) {
    case 1: return micro_codes_amx<1, kSigned>(a, lda, planes, chunks, acc);
    case 2: return micro_codes_amx<2, kSigned>(a, lda, planes, chunks, acc);
    default: return micro_codes_amx<3, kSigned>(a, lda, planes, chunks, acc);
  }
}

// An int8 panel (pairs of K: byte c*2 + t = W[c, 2p + t]) as planes (quads: byte c*4 + t = W[c, 4q + t]): the
// 16-bit pairs of steps 2q and 2q + 1 interleaved, then the 128-bit halves put in output order. kPlus128: the
// weights + 128 as u8 (VNNI's unsigned operand; the epilogue's zero point is then w_zero + 128), else s8 (AMX).
template <bool kPlus128>
__attribute__((target("avx2"))) void interleave_int8_panel_avx2(const uint8_t* panel, int64_t pairs, uint8_t* out) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(kPlus128 ? 0x80 : 0));
  for (int64_t q = 0; 2 * q < pairs; ++q) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + 2 * q * kStepBytes));
    const __m256i x1 = 2 * q + 1 < pairs
        ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (2 * q + 1) * kStepBytes))
        : _mm256_setzero_si256();
    const __m256i lo = _mm256_unpacklo_epi16(x0, x1), hi = _mm256_unpackhi_epi16(x0, x1);  // outputs 0-3|8-11, 4-7|12-15
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q * 64),
                        _mm256_xor_si256(_mm256_permute2x128_si256(lo, hi, 0x20), flip));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q * 64 + 32),
                        _mm256_xor_si256(_mm256_permute2x128_si256(lo, hi, 0x31), flip));
  }
}
#endif

// ---------------------------------------------------------------------------------------------------
// Prepacking: the GPU layout (kernels/packing.py) -> CPU panels
// ---------------------------------------------------------------------------------------------------

at::Tensor native_prepack_weight(const at::Tensor& w_in, int64_t storage_bits, int64_t k, int64_t group_k) {
  TORCH_CHECK(storage_bits == 3 || storage_bits == 4 || storage_bits == 8,
              "dfqvit native prepack: storage_bits=", storage_bits, "; allowed 3, 4, 8.");
  TORCH_CHECK(w_in.dim() == 2 && w_in.device().is_cpu(), "dfqvit native prepack: w must be a 2-D CPU tensor.");
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.size(0), steps = panel_steps(k, storage_bits), panels = (n + kNR - 1) / kNR;
  const int64_t row_bytes = w.size(1), lane = lane_k(storage_bits);
  at::Tensor out = at::zeros({panels, steps, kStepBytes}, at::kByte);
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(k);
    for (int64_t panel = begin; panel < end; ++panel) {
      uint8_t* pp = dst + panel * steps * kStepBytes;
      for (int c = 0; c < kNR && panel * kNR + c < n; ++c) {
        const int64_t row = panel * kNR + c;
        const uint8_t* src = static_cast<const uint8_t*>(w.data_ptr()) + row * row_bytes;
        if (storage_bits == 8) {
          for (int64_t i = 0; i < k; ++i) pp[(i / lane) * kStepBytes + c * lane + i % lane] = src[i];
        } else {
          unpack_row(src, storage_bits, k, group_k, codes.data());
          const int slot = c % 8, shift = c < 8 ? 0 : 4;
          for (int64_t i = 0; i < k; ++i)
            pp[(i / 4) * kStepBytes + slot * 4 + i % 4] |= static_cast<uint8_t>(codes[i] << shift);
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Activation rows
// ---------------------------------------------------------------------------------------------------

// The activation rows as the nibble kernels read them, with their sums: a + 128 as u8 (kPlus128: the scalar nibble
// kernel) or a as it is (the plane kernels). dst[j] for j < k (no copy when dst is null); returns sum_j dst[j].
#if DFQVIT_X86
template <bool kPlus128>
__attribute__((target("avx2"))) int64_t copy_row_avx2(const int8_t* src, int64_t k, uint8_t* dst, int64_t* total) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), zero = _mm256_setzero_si256();
  __m256i sums = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j)), plus = _mm256_xor_si256(x, flip);
    if (dst) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), kPlus128 ? plus : x);
    sums = _mm256_add_epi64(sums, _mm256_sad_epu8(plus, zero));  // vpsadbw sums u8: those of a + 128
  }
  alignas(32) int64_t parts[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(parts), sums);
  *total = parts[0] + parts[1] + parts[2] + parts[3] - (kPlus128 ? 0 : 128 * j);
  return j;
}
#endif

template <bool kPlus128>
int32_t copy_row(const int8_t* src, int64_t k, uint8_t* dst, Isa isa) {
  int64_t total = 0, j = 0;
#if DFQVIT_X86
  if (isa != Isa::kScalar) j = copy_row_avx2<kPlus128>(src, k, dst, &total);
#endif
  for (; j < k; ++j) {
    const int32_t x = kPlus128 ? src[j] + 128 : src[j];
    if (dst) dst[j] = static_cast<uint8_t>(x);
    total += x;
  }
  return static_cast<int32_t>(total);
}

// dst[j] = a[j] - a_zero (as s16) for j < k; returns sum_j dst[j].
DFQVIT_AVX2_CLONES int32_t pack_row_s16(const int8_t* src, int64_t k, int16_t zero, int16_t* dst) {
  int32_t total = 0;
  for (int64_t j = 0; j < k; ++j) {
    dst[j] = static_cast<int16_t>(src[j] - zero);
    total += dst[j];
  }
  return total;
}

// ---------------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------------

// out[j] = y[j] + x[j] for j < n (fp32, the epilogue's y + residual; out may be y).
DFQVIT_AVX2_CLONES void add_row(float* out, const float* y, const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = y[j] + x[j];
}

// Fetch for writing the cache lines of bytes [0, seg) of `rows` rows (stride apart) starting at `first`: the
// epilogue's fp32 output block of one panel, requested while the panel's micro-kernels run so that its stores do
// not wait on reads for ownership. In later panels (!first_panel) a row's first line is skipped unless the
// segment starts it: the previous panel's segment requested it. A/B with an fp32 F.linear between the calls (the
// benchmark's order), fp32 out: the CIFAR layer shapes at M 4160 3-11% faster, at M 520 0-9% (int8 out: 1-4%
// slower, so not there).
inline void prefetch_for_write(const char* p) {
#if DFQVIT_X86 && defined(__GNUC__)
  asm volatile("prefetchw %0" : : "m"(*p));  // a no-op on x86-64 CPUs without it
#else
  __builtin_prefetch(p, 1, 3);
#endif
}

inline void prefetch_rows_for_write(const char* first, int64_t stride, int rows, int64_t seg, bool first_panel) {
  const auto line = [](const char* p) { return reinterpret_cast<uintptr_t>(p) >> 6; };
  for (int r = 0; r < rows; ++r) {
    const char* p = first + r * stride;
    const char* last = p + seg - 1;
    if (first_panel || (reinterpret_cast<uintptr_t>(p) & 63) == 0) prefetch_for_write(p);
    if (line(last) != line(p)) prefetch_for_write(last);
  }
}

// Row tiles of kTileRows rows, claimed one at a time by the threads (parallel.h), each through all panels. Per
// panel, the micro-kernel fills the tile's accumulator block (kTileRows x kNR, in L1) and one epilogue call
// finishes it: long runs of vectors keep the divider and the out-of-order window busy. An fp32 residual is added
// after the last panel, row by row over the tile: added per panel, it was read one 64-byte line per row, which
// made proj (M 4160, N 192, K 192) 7-22% and fc2 (K 768) 4-9% slower (A/B on one and two threads). With a
// residual the panels' epilogues write into a per-thread staging block (kTileRows x N, up to kStagingBytes) and
// the rows go out once, residual added, in order: the output lines are not read for ownership by scattered
// 64-byte stores per panel and again by the residual pass. A/B: the residual GEMMs at M 4160 4-9% faster, the
// engine 1-3%. (Staging the fp32 outputs without a residual was 6% slower at M 520: one more copy.)
// prep(panel, scratch) returns the weight bytes the micro-kernel reads for that panel (the panel itself, or
// its unpacked form written to the thread's scratch of scratch_bytes). tile_start(m0, m1) runs first in each row
// tile (the row sums of activations read in place; AMX's tile configuration). micro(row, rows, w, acc) covers up to
// micro_rows rows (kMR, or a whole row tile for AMX).
struct NoTileStart {
  void operator()(int64_t, int64_t) const {}
};

template <typename Micro, typename Prep, typename TileStart = NoTileStart>
void run_tiles(int64_t m, int64_t panels, const Epilogue& ep, Isa isa, Micro micro, Prep prep,
               int64_t scratch_bytes, TileStart tile_start = {}, int64_t micro_rows = kMR) {
  const int64_t row_tiles = (m + kTileRows - 1) / kTileRows;
  const bool residual_after = ep.residual && !ep.requant;
  const bool use_stage = residual_after && kTileRows * ep.n * int64_t(sizeof(float)) <= kStagingBytes;
  Epilogue panel_ep = ep;
  if (residual_after) panel_ep.residual = nullptr;
#if DFQVIT_X86
  const EpilogueFn epilogue_vector = epilogue_vector_for(panel_ep);
#endif
  // A row tile per claim. A/B against at::parallel_for's fixed halves over the four CIFAR layer shapes: sum of
  // medians 23.45 vs 23.53 and 28.67 vs 30.15 ms at M 4160, 2.56 vs 2.56 at M 520.
  parallel_claims(row_tiles, 1, [&](auto& claim) {
    alignas(64) int32_t acc[kTileRows * kNR];
    std::vector<uint8_t> scratch(scratch_bytes);
    std::vector<float> norm_scratch(ep.norm ? ep.n : 0);
    std::unique_ptr<float[]> staged(use_stage ? new float[kTileRows * ep.n] : nullptr);  // no zero fill
    for (int64_t tile, last; claim(&tile, &last);) {
      const int64_t m0 = tile * kTileRows, m1 = std::min(m, m0 + kTileRows);
      const int rows = static_cast<int>(m1 - m0);
      tile_start(m0, m1);
      Epilogue tile_ep = panel_ep;
      int64_t em = m0;
      if (use_stage) {  // rows of the tile relative to m0, fp32 output into the staging block
        tile_ep.row_sums = ep.row_sums + m0;
        tile_ep.out_f32 = staged.get();
        em = 0;
      }
      for (int64_t panel = 0; panel < panels; ++panel) {
        const int64_t col0 = panel * kNR;
        const int width = static_cast<int>(std::min<int64_t>(kNR, ep.n - col0));
        const auto* w = prep(panel, scratch.data());
        if (tile_ep.out_f32 && !use_stage)  // fp32 out only: int8 out was 1-4% slower (A/B); staging stays cached
          prefetch_rows_for_write(reinterpret_cast<const char*>(tile_ep.out_f32 + em * ep.n + col0),
                                  ep.n * int64_t(sizeof(float)), rows, width * int64_t(sizeof(float)), panel == 0);
        for (int64_t row = m0; row < m1; row += micro_rows)
          micro(row, static_cast<int>(std::min<int64_t>(micro_rows, m1 - row)), w, acc + (row - m0) * kNR);
#if DFQVIT_X86
        if (isa != Isa::kScalar) {
          epilogue_vector(tile_ep, acc, em, rows, col0, width);
          continue;
        }
#endif
        epilogue_scalar(tile_ep, acc, em, rows, col0, width);
      }
      if (use_stage) {
        for (int64_t r = m0; r < m1; ++r)
          add_row(ep.out_f32 + r * ep.n, staged.get() + (r - m0) * ep.n, ep.residual + r * ep.ld_residual, ep.n);
      } else if (residual_after) {
        for (int64_t r = m0; r < m1; ++r) {
          float* y = ep.out_f32 + r * ep.n;
          add_row(y, y, ep.residual + r * ep.ld_residual, ep.n);
        }
      }
      if (ep.norm)
        layernorm_quant_rows(ep.norm->ln, ep.out_f32 + m0 * ep.n, m1 - m0, ep.n, ep.norm->codes + m0 * ep.n,
                             norm_scratch.data(), isa);
    }
  });
}

// t (1-D) as a std::vector of `size` entries, zero-padded: plain vectors, not ATen ops, for these per-call
// column parameters (a dozen small tensor ops cost ~50 us a call, a fifth of a batch-8 CIFAR layer).
template <typename T>
std::vector<T> padded(const at::Tensor& t, int64_t size) {
  std::vector<T> out(size, T(0));
  const at::ScalarType type = c10::CppTypeToScalarType<T>::value;
  const at::Tensor c = t.scalar_type() == type && t.is_contiguous() ? t : t.to(type).contiguous();
  std::copy(c.data_ptr<T>(), c.data_ptr<T>() + c.numel(), out.begin());
  return out;
}

at::Tensor qgemm_prepacked_impl(const at::Tensor& a_in, double a_scale, int64_t a_zero, const at::Tensor& panels_in,
                                int64_t n, const at::Tensor& w_scale, const at::Tensor& w_zero,
                                const at::Tensor& w_col_sums, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& residual, int64_t storage_bits, int64_t k, bool gelu,
                                c10::optional<double> out_scale, int64_t out_zero, int64_t out_qmin, int64_t out_qmax,
                                at::ScalarType out_dtype, const c10::optional<at::Tensor>& out_grid,
                                const NormOutput* norm) {
  TORCH_CHECK(a_in.dim() == 2 && a_in.scalar_type() == at::kChar && a_in.size(1) == k,
              "dfqvit native qgemm: a must be int8 (M, K=", k, "), got ", a_in.sizes(), " ", a_in.scalar_type());
  const int64_t steps = panel_steps(k, storage_bits), panels = (n + kNR - 1) / kNR;
  TORCH_CHECK(panels_in.scalar_type() == at::kByte && panels_in.dim() == 3 && panels_in.size(0) == panels &&
                  panels_in.size(1) == steps && panels_in.size(2) == kStepBytes,
              "dfqvit native qgemm: prepacked weight must be uint8 (", panels, ", ", steps, ", ", kStepBytes,
              ") for n=", n, ", k=", k, " (native_prepack_weight), got ", panels_in.sizes());
  const Isa isa = active_isa();
  const at::Tensor a = a_in.contiguous(), wp = panels_in.contiguous();
  const bool nibbles = storage_bits != 8, amx = isa == Isa::kAmxInt8, vnni = isa == Isa::kAvx512Vnni;
  // AMX, VNNI and AVX2 nibbles read the activations as they are (s8) against planes of the weights (plane kernels);
  // in place when the rows need no padding (AMX: K a multiple of 64; in-process A/B against a padded copy on the
  // 2-core Xeon: GEMMs 1.02-1.30x, the CIFAR engine 1.05-1.06x). The scalar nibble kernel reads a + 128 (u8), the
  // other int8 ones a - a_zero (s16).
  const bool signed_acts = (nibbles && isa == Isa::kAvx2) || vnni || amx;
  const bool acts8 = nibbles || signed_acts;  // the activations as bytes (else s16)
  // Activation rows as the micro-kernels read them: K padded to whole quads (bytes) or pairs (s16), or for AMX to
  // whole 64-byte tile rows (and the row count to whole 16-row tiles).
  const int64_t m = a.size(0), np = panels * kNR;
  const int64_t ld = amx ? round_up(k, kAmxBytes) : acts8 ? round_up(k, 4) : steps * lane_k(storage_bits);
  const int64_t m_rows = amx ? round_up(m, kAmxRows) : m;
  const bool direct = signed_acts && ld == k;

  std::vector<float> row_scale = padded<float>(w_scale, np);
  for (float& x : row_scale) x = static_cast<float>(a_scale) * x;  // reference: fp32(a_scale) * w_scale
  const std::vector<float> bias_f = bias.has_value() ? padded<float>(*bias, np) : std::vector<float>();
  // VNNI's int8 planes hold W + 128: sum a (W + 128) - (w_zero + 128) sum a = sum a (W - w_zero).
  std::vector<int32_t> zero = padded<int32_t>(w_zero, np);
  if (vnni && !nibbles)
    for (int32_t& z : zero) z += 128;
  std::vector<int32_t> col_term(np, 0);
  if (acts8) {
    const std::vector<int32_t> sums = padded<int32_t>(w_col_sums, np);
    const int32_t a_offset = static_cast<int32_t>(a_zero) + (signed_acts ? 0 : 128);
    for (int64_t c = 0; c < np; ++c) col_term[c] = a_offset * sums[c];
  }
  at::Tensor res;
  if (residual.has_value()) {
    res = residual->to(at::kFloat);
    if (res.stride(1) != 1) res = res.contiguous();
  }
  // Re-quantization grid per column, rows scale, zero, qmin, qmax: out_grid (4, N), or the per-tensor scalars
  // repeated. Padding columns keep scale 1 (never stored).
  const bool requant = out_scale.has_value() || out_grid.has_value();
  std::vector<float> grid(4 * np, 1.0f);
  if (out_grid.has_value()) {
    TORCH_CHECK(out_grid->dim() == 2 && out_grid->size(0) == 4 && out_grid->size(1) == n,
                "dfqvit native qgemm: out_grid must be (4, N=", n, "): scale, zero, qmin, qmax per column, got ",
                out_grid->sizes());
    const at::Tensor g = out_grid->to(at::kFloat).contiguous();
    for (int row = 0; row < 4; ++row)
      std::copy(g.data_ptr<float>() + row * n, g.data_ptr<float>() + (row + 1) * n, grid.begin() + row * np);
  } else if (requant) {
    const float values[4] = {static_cast<float>(*out_scale), static_cast<float>(out_zero),
                             static_cast<float>(out_qmin), static_cast<float>(out_qmax)};
    for (int row = 0; row < 4; ++row) std::fill(grid.begin() + row * np, grid.begin() + (row + 1) * np, values[row]);
  }
  const float* gp = grid.data();
  at::Tensor out = at::empty({m, n}, requant ? at::kChar : at::kFloat);
  if (m == 0) return requant || out_dtype == at::kFloat ? out : out.to(out_dtype);

  // Activations once, K padded to the lane, with row sums: a as it is (AVX2 nibbles; no copy when K is a multiple
  // of the lane), a + 128 as u8 (other nibble kernels) or a - a_zero as s16 (int8). Buffers without the zero fill
  // of std::vector (a memset of M x K bytes was ~2% of the engine's time); only the padding of each row is zeroed.
  const int8_t* a8 = a.data_ptr<int8_t>();
  std::unique_ptr<uint8_t[]> au(acts8 && !direct ? new uint8_t[m_rows * ld] : nullptr);
  std::unique_ptr<int16_t[]> as(acts8 ? nullptr : new int16_t[m * ld]);
  std::vector<int32_t> row_sums(m);
  // Read in place, the rows are summed by the thread that runs their tile, just before the tile's first panel
  // (the rows come into L1 for the micro-kernel anyway): fc2 (K 768, M 4160) 9-11% faster than a separate pass
  // over the activations, the other CIFAR shapes unchanged (A/B).
  [[maybe_unused]] auto tile_row_sums = [&](int64_t m0, int64_t m1) {  // x86 kernels only
    if (direct)
      for (int64_t i = m0; i < m1; ++i) row_sums[i] = copy_row<false>(a8 + i * k, k, nullptr, isa);
  };
  if (!direct) at::parallel_for(0, m, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (acts8) {
        uint8_t* dst = au.get() + i * ld;
        row_sums[i] = signed_acts ? copy_row<false>(a8 + i * k, k, dst, isa) : copy_row<true>(a8 + i * k, k, dst, isa);
        std::fill(dst + k, dst + ld, uint8_t(0));
      } else {
        row_sums[i] = pack_row_s16(a8 + i * k, k, static_cast<int16_t>(a_zero), as.get() + i * ld);
        std::fill(as.get() + i * ld + k, as.get() + (i + 1) * ld, int16_t(0));
      }
    }
  });
  if (au && m_rows > m) std::fill(au.get() + m * ld, au.get() + m_rows * ld, uint8_t(0));
  // AMX reading in place (K a multiple of 64): its A tiles read whole 16-row groups, so a last row tile that ends
  // inside a group is read from a zero-padded copy of that tile instead of past the end of a.
  const int64_t last_tile = (m - 1) / kTileRows * kTileRows;
  std::unique_ptr<int8_t[]> last_rows(amx && direct && m % kAmxRows ? new int8_t[kTileRows * ld]() : nullptr);
  if (last_rows) std::copy(a8 + last_tile * k, a8 + m * k, last_rows.get());

  Epilogue ep{row_scale.data(), col_term.data(), zero.data(), row_sums.data(),
              bias.has_value() ? bias_f.data() : nullptr, gelu,
              res.defined() ? res.data_ptr<float>() : nullptr, res.defined() ? res.stride(0) : 0, requant,
              gp, gp + np, gp + 2 * np, gp + 3 * np, requant ? nullptr : out.data_ptr<float>(),
              requant ? out.data_ptr<int8_t>() : nullptr, n, norm,
              has_avx512(isa)};
  const uint8_t* wbytes = wp.data_ptr<uint8_t>();
  const int64_t panel_bytes = steps * kStepBytes;
  // micro(rows, a, w, acc) for a block of rows: kMR at once when the block is full, else one row at a time.
  auto blocks = [&](const auto* ap, auto micro) {
    return [=](int64_t row, int rows, const auto* w, int32_t* acc) {
      if (rows == kMR) return micro(std::integral_constant<int, kMR>{}, ap + row * ld, w, acc);
      for (int r = 0; r < rows; ++r) micro(std::integral_constant<int, 1>{}, ap + (row + r) * ld, w, acc + r * kNR);
    };
  };
  auto panel_at = [&](const auto* base) {  // the identity prep: micro-kernels read the packed panel
    return [=](int64_t panel, uint8_t*) { return base + panel * panel_bytes; };
  };
#if DFQVIT_X86
  if (signed_acts) {
    const int8_t* sp = direct ? a8 : reinterpret_cast<const int8_t*>(au.get());
    // Planes: the weights as these kernels read them, 64 bytes per quad of K (16 outputs x 4 positions): nibble
    // codes as u8, or int8 weights regrouped from pairs. AMX reads them 16 quads at a time: padded to that (zeros).
    const int64_t quads = (k + 3) / 4, plane_quads = amx ? round_up(quads, kAmxChunkQuads) : quads;
    const int64_t plane_bytes = plane_quads * 64;
    auto unpack = [&](int64_t panel, uint8_t* dst) {
      if (nibbles)
        unpack_panel_avx2(wbytes + panel * panel_bytes, steps, dst);
      else if (vnni)
        interleave_int8_panel_avx2<true>(wbytes + panel * panel_bytes, steps, dst);
      else
        interleave_int8_panel_avx2<false>(wbytes + panel * panel_bytes, steps, dst);
      std::memset(dst + quads * 64, 0, (plane_quads - quads) * 64);
    };
    // All panels unpacked once per call (a temporary of N x K bytes) when that is at most kPlanesOnceBytes (AMX,
    // and VNNI with at least kPlanesOnceRowsVnni rows: up to kPlanesOnceBytesAmx) and there are several row tiles;
    // otherwise each tile unpacks each panel into its L1 scratch.
    auto run_planes = [&](auto micro, auto tile_start, int64_t micro_rows) {
      const bool large_once = amx || (vnni && m >= kPlanesOnceRowsVnni);
      if (panels * plane_bytes <= (large_once ? kPlanesOnceBytesAmx : kPlanesOnceBytes) && m > kTileRows) {
        at::Tensor planes = at::empty({panels * plane_bytes}, at::kByte);
        uint8_t* pp = planes.data_ptr<uint8_t>();
        at::parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
          for (int64_t p = b; p < e; ++p) unpack(p, pp + p * plane_bytes);
        });
        run_tiles(m, panels, ep, isa, micro, [&](int64_t panel, uint8_t*) -> const uint8_t* {
          return pp + panel * plane_bytes;
        }, 0, tile_start, micro_rows);
      } else {
        run_tiles(m, panels, ep, isa, micro, [&](int64_t panel, uint8_t* scratch) -> const uint8_t* {
          unpack(panel, scratch);
          return scratch;
        }, plane_bytes, tile_start, micro_rows);
      }
    };
    if (amx) {
      const int64_t chunks = plane_quads / kAmxChunkQuads;
      const auto micro_amx = nibbles ? &micro_codes_amx_rows<false> : &micro_codes_amx_rows<true>;
      run_planes([&](int64_t row, int rows, const uint8_t* w, int32_t* acc) {
        const int8_t* src = last_rows && row >= last_tile ? last_rows.get() + (row - last_tile) * ld : sp + row * ld;
        micro_amx(src, ld, rows, w, chunks, acc);
      }, [&](int64_t m0, int64_t m1) {
        amx_configure();
        tile_row_sums(m0, m1);
      }, kTileRows);
    } else if (vnni) {
      run_planes([&](int64_t row, int rows, const uint8_t* w, int32_t* acc) {
        micro_planes_vnni_rows(sp + row * ld, ld, rows, w, quads, acc);
      }, tile_row_sums, kVnniMR);
    } else {
      run_planes(blocks(sp, [&](auto mr, const int8_t* a8r, const uint8_t* w, int32_t* acc) {
        micro_codes_avx2<decltype(mr)::value>(a8r, ld, w, steps, acc);
      }), tile_row_sums, kMR);
    }
  } else if (!nibbles && isa != Isa::kScalar) {
    run_tiles(m, panels, ep, isa, blocks(as.get(), [&](auto mr, const int16_t* a16r, const int8_t* w, int32_t* acc) {
      micro_int8_avx2<decltype(mr)::value>(a16r, ld, w, steps, acc);
    }), panel_at(reinterpret_cast<const int8_t*>(wbytes)), 0);
  } else
#endif
  if (nibbles) {
    run_tiles(m, panels, ep, isa, blocks(au.get(), [&](auto mr, const uint8_t* a8r, const uint8_t* w, int32_t* acc) {
      micro_nibble_scalar(a8r, ld, decltype(mr)::value, w, steps, acc);
    }), panel_at(wbytes), 0);
  } else {
    run_tiles(m, panels, ep, isa, blocks(as.get(), [&](auto mr, const int16_t* a16r, const int8_t* w, int32_t* acc) {
      micro_int8_scalar(a16r, ld, decltype(mr)::value, w, steps, acc);
    }), panel_at(reinterpret_cast<const int8_t*>(wbytes)), 0);
  }
  if (requant || out_dtype == at::kFloat) return out;
  return out.to(out_dtype);  // fp16 / bf16: the reference's y.to(out_dtype), round to nearest even
}

at::Tensor native_qgemm_prepacked(const at::Tensor& a, double a_scale, int64_t a_zero, const at::Tensor& panels,
                                  int64_t n, const at::Tensor& w_scale, const at::Tensor& w_zero,
                                  const at::Tensor& w_col_sums, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& residual, int64_t storage_bits, int64_t k,
                                  bool gelu, c10::optional<double> out_scale, int64_t out_zero, int64_t out_qmin,
                                  int64_t out_qmax, at::ScalarType out_dtype,
                                  const c10::optional<at::Tensor>& out_grid) {
  return qgemm_prepacked_impl(a, a_scale, a_zero, panels, n, w_scale, w_zero, w_col_sums, bias, residual,
                              storage_bits, k, gelu, out_scale, out_zero, out_qmin, out_qmax, out_dtype, out_grid,
                              nullptr);
}

// The fp32 GEMM (+ bias, + residual) and the int8 codes of LayerNorm(output) on a grid: what a pre-norm block's
// residual branch hands to the next block (the residual stream and the next GEMM's input). Each row tile is
// normalized right after its last panel, from cache, instead of a separate pass over the output (bit for bit
// native_qgemm_prepacked followed by native_layernorm_quant).
std::tuple<at::Tensor, at::Tensor> native_qgemm_prepacked_norm(
    const at::Tensor& a, double a_scale, int64_t a_zero, const at::Tensor& panels, int64_t n,
    const at::Tensor& w_scale, const at::Tensor& w_zero, const at::Tensor& w_col_sums,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, int64_t storage_bits, int64_t k,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps, double norm_scale, int64_t norm_zero,
    int64_t norm_qmin, int64_t norm_qmax) {
  TORCH_CHECK(norm_weight.dim() == 1 && norm_bias.dim() == 1 && norm_weight.size(0) == n && norm_bias.size(0) == n,
              "dfqvit native qgemm_norm: LayerNorm weight and bias must be (N=", n, ",), got ", norm_weight.sizes(),
              ", ", norm_bias.sizes());
  const at::Tensor w = norm_weight.to(at::kFloat).contiguous(), b = norm_bias.to(at::kFloat).contiguous();
  at::Tensor codes = at::empty({a.size(0), n}, at::kChar);
  const NormOutput norm{{w.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(eps),
                         make_grid(norm_scale, norm_zero, norm_qmin, norm_qmax)},
                        codes.data_ptr<int8_t>()};
  at::Tensor out = qgemm_prepacked_impl(a, a_scale, a_zero, panels, n, w_scale, w_zero, w_col_sums, bias, residual,
                                        storage_bits, k, false, c10::nullopt, 0, 0, 0, at::kFloat, c10::nullopt,
                                        &norm);
  return {out, codes};
}

// sum_k (W[n, k] - w_zero[n]) over the true K, from the panels (zero beyond K and N).
at::Tensor panel_col_sums(const at::Tensor& panels, int64_t storage_bits, int64_t k, int64_t n,
                          const at::Tensor& w_zero) {
  const int64_t steps = panels.size(1);
  const std::vector<int32_t> zero = padded<int32_t>(w_zero, panels.size(0) * kNR);
  at::Tensor sums = at::empty({n}, at::kInt);
  const uint8_t* bytes = panels.data_ptr<uint8_t>();
  for (int64_t col = 0; col < n; ++col) {
    const int64_t panel = col / kNR, c = col % kNR;
    const uint8_t* pp = bytes + panel * steps * kStepBytes;
    int32_t total = 0;
    for (int64_t s = 0; s < steps; ++s) {
      if (storage_bits == 8) {
        for (int t = 0; t < 2; ++t) total += static_cast<int8_t>(pp[s * kStepBytes + c * 2 + t]);
      } else {
        for (int t = 0; t < 4; ++t) {
          const uint8_t byte = pp[s * kStepBytes + (c % 8) * 4 + t];
          total += c < 8 ? (byte & 0xF) : (byte >> 4);
        }
      }
    }
    sums.data_ptr<int32_t>()[col] = total - static_cast<int32_t>(k) * zero[col];
  }
  return sums;
}

// The GPU layout in, prepacked per call: the CPU implementation of dfqvit::qgemm (column sums recomputed, as
// the reference ignores them). The engine prepacks once and calls native_qgemm_prepacked.
at::Tensor native_qgemm(const at::Tensor& a, double a_scale, int64_t a_zero, const at::Tensor& w_packed,
                        const at::Tensor& w_scale, const at::Tensor& w_zero, const at::Tensor& w_col_sums,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                        int64_t storage_bits, int64_t k, int64_t group_k, bool gelu, c10::optional<double> out_scale,
                        int64_t out_zero, int64_t out_qmin, int64_t out_qmax, at::ScalarType out_dtype) {
  (void)w_col_sums;
  const at::Tensor panels = native_prepack_weight(w_packed, storage_bits, k, group_k);
  const at::Tensor sums = panel_col_sums(panels, storage_bits, k, w_packed.size(0), w_zero);
  return native_qgemm_prepacked(a, a_scale, a_zero, panels, w_packed.size(0), w_scale, w_zero, sums, bias,
                                residual, storage_bits, k, gelu, out_scale, out_zero, out_qmin, out_qmax, out_dtype,
                                c10::nullopt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dfqvit, m) {
  m.def("native_prepack_weight(Tensor w_packed, int storage_bits, int k, int group_k) -> Tensor");
  m.def("native_qgemm(Tensor a, float a_scale, int a_zero, Tensor w_packed, Tensor w_scale, Tensor w_zero, "
        "Tensor w_col_sums, Tensor? bias, Tensor? residual, int storage_bits, int k, int group_k, bool gelu, "
        "float? out_scale, int out_zero, int out_qmin, int out_qmax, ScalarType out_dtype) -> Tensor");
  m.def("native_qgemm_prepacked(Tensor a, float a_scale, int a_zero, Tensor panels, int n, Tensor w_scale, "
        "Tensor w_zero, Tensor w_col_sums, Tensor? bias, Tensor? residual, int storage_bits, int k, bool gelu, "
        "float? out_scale, int out_zero, int out_qmin, int out_qmax, ScalarType out_dtype, Tensor? out_grid=None) "
        "-> Tensor");
  m.def("native_qgemm_prepacked_norm(Tensor a, float a_scale, int a_zero, Tensor panels, int n, Tensor w_scale, "
        "Tensor w_zero, Tensor w_col_sums, Tensor? bias, Tensor? residual, int storage_bits, int k, "
        "Tensor norm_weight, Tensor norm_bias, float eps, float norm_scale, int norm_zero, int norm_qmin, "
        "int norm_qmax) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dfqvit, CPU, m) {
  m.impl("native_prepack_weight", &native_prepack_weight);
  m.impl("native_qgemm", &native_qgemm);
  m.impl("native_qgemm_prepacked", &native_qgemm_prepacked);
  m.impl("native_qgemm_prepacked_norm", &native_qgemm_prepacked_norm);
}

}  // namespace dfqvit
