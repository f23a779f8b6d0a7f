// dfqvit::native_qgemm: int8 activations x packed int4 / int3 (or int8) weights on the CPU, exact int32
// accumulation, the fused epilogue of kernels/qgemm.py (scale, bias, GELU, residual, re-quantize), bit for
// bit equal to kernels/reference.py:qgemm_reference.
//
// How (per call):
//   1. Weights are unpacked once into column panels of NR outputs: panel[quad][NR][4] int8 holds
//      W[n, 4q..4q+3] - w_zero[n] (0 beyond K), so one 32-bit lane = four K positions of one output.
//      int8 weights (|W - w_zero| up to 255) use int16 pairs instead: panel[pair][NR][2].
//   2. Activations are copied once with K padded to the lane width: a + 128 as uint8 (int4/int3), or
//      a - a_zero as int16 (int8 weights).
//   3. Output tiles (rows x panels) run in parallel (at::parallel_for: torch's OpenMP pool and thread
//      count). A micro-kernel keeps MR rows x NR int32 accumulators in registers:
//        AVX-512 VNNI: vpdpbusd (u8 x s8, 4 products per lane) on 16 outputs;
//        AVX2: vpmaddubsw (u8 x s8 pairs -> s16; |W - w_zero| <= 15 keeps four of them below 2**15),
//              vpmaddwd with ones -> s32, add; int16 path: vpmaddwd directly;
//        scalar: the same sums in plain C++.
//      sum (a + 128)(W - w_zero) = sum (a - a_zero)(W - w_zero) + (128 + a_zero) * colsum[n], so the
//      zero points cost one subtraction per output.
//   4. The epilogue runs on the accumulators in registers, in the reference's fp32 order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "portable_math.h"

namespace dfqvit {
namespace {

constexpr int kMaxNR = 16;

struct Epilogue {
  const float* row_scale;  // (Np) a_scale * w_scale
  const int32_t* correction;  // (Np) subtracted from the accumulator (zero points)
  const float* bias;       // (Np) or nullptr
  bool gelu;
  const float* residual;   // (M, ld_residual) fp32 or nullptr
  int64_t ld_residual;
  bool requant;
  float out_scale, out_zero, out_qmin, out_qmax;
  float* out_f32;          // (M, N) when !requant
  int8_t* out_i8;          // (M, N) when requant
  int64_t n;               // true N (row stride of the output)
};

inline float epilogue_value(const Epilogue& ep, int32_t acc, int64_t m, int64_t col) {
  float y = static_cast<float>(acc - ep.correction[col]) * ep.row_scale[col];
  if (ep.bias) y = y + ep.bias[col];
  if (ep.gelu) y = pm::gelu(y);
  if (ep.residual) y = y + ep.residual[m * ep.ld_residual + col];
  return y;
}

inline void store_scalar(const Epilogue& ep, int32_t acc, int64_t m, int64_t col) {
  const float y = epilogue_value(ep, acc, m, col);
  if (ep.requant) {
    float q = std::nearbyint(y / ep.out_scale) + ep.out_zero;
    q = std::fmin(std::fmax(q, ep.out_qmin), ep.out_qmax);
    ep.out_i8[m * ep.n + col] = static_cast<int8_t>(q);
  } else {
    ep.out_f32[m * ep.n + col] = y;
  }
}

// Rows [m, m + rows) x columns [col0, col0 + width) of accumulators acc[r * stride + c].
void epilogue_scalar(const Epilogue& ep, const int32_t* acc, int64_t stride, int64_t m, int rows, int64_t col0,
                     int width) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < width; ++c) store_scalar(ep, acc[r * stride + c], m + r, col0 + c);
}

#if DFQVIT_X86
__attribute__((target("avx2"))) void epilogue_avx2(const Epilogue& ep, const int32_t* acc, int64_t stride,
                                                   int64_t m, int rows, int64_t col0, int width) {
  const int full = width / 8 * 8;
  for (int r = 0; r < rows; ++r) {
    const int64_t row = m + r;
    for (int c = 0; c < full; c += 8) {
      const int64_t col = col0 + c;
      __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * stride + c));
      a = _mm256_sub_epi32(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ep.correction + col)));
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_loadu_ps(ep.row_scale + col));
      if (ep.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(ep.bias + col));
      if (ep.gelu) y = pm::gelu_avx2(y);
      if (ep.residual) y = _mm256_add_ps(y, _mm256_loadu_ps(ep.residual + row * ep.ld_residual + col));
      if (ep.requant) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(y, _mm256_set1_ps(ep.out_scale)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_add_ps(q, _mm256_set1_ps(ep.out_zero));
        q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(ep.out_qmin)), _mm256_set1_ps(ep.out_qmax));
        const __m256i qi = _mm256_cvtps_epi32(q);  // integral already: exact
        const __m128i lo = _mm256_castsi256_si128(qi), hi = _mm256_extracti128_si256(qi, 1);
        const __m128i packed16 = _mm_packs_epi32(lo, hi);
        const __m128i packed8 = _mm_packs_epi16(packed16, packed16);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(ep.out_i8 + row * ep.n + col), packed8);
      } else {
        _mm256_storeu_ps(ep.out_f32 + row * ep.n + col, y);
      }
    }
    for (int c = full; c < width; ++c) store_scalar(ep, acc[r * stride + c], row, col0 + c);
  }
}
#endif

// ---------------------------------------------------------------------------------------------------
// Micro-kernels: acc[r * NR + c] = sum over the panel of a_row_r . panel_column_c
// ---------------------------------------------------------------------------------------------------

template <int NR>
void micro_u8_scalar(const uint8_t* a, int64_t lda, int rows, const int8_t* panel, int64_t quads, int32_t* acc) {
  for (int r = 0; r < rows; ++r) {
    int32_t sums[NR] = {0};
    const uint8_t* ar = a + r * lda;
    for (int64_t q = 0; q < quads; ++q) {
      const int8_t* w = panel + q * NR * 4;
      for (int c = 0; c < NR; ++c)
        for (int t = 0; t < 4; ++t) sums[c] += int32_t(ar[4 * q + t]) * int32_t(w[4 * c + t]);
    }
    std::memcpy(acc + r * NR, sums, sizeof sums);
  }
}

template <int NR>
void micro_s16_scalar(const int16_t* a, int64_t lda, int rows, const int16_t* panel, int64_t pairs, int32_t* acc) {
  for (int r = 0; r < rows; ++r) {
    int32_t sums[NR] = {0};
    const int16_t* ar = a + r * lda;
    for (int64_t p = 0; p < pairs; ++p) {
      const int16_t* w = panel + p * NR * 2;
      for (int c = 0; c < NR; ++c)
        for (int t = 0; t < 2; ++t) sums[c] += int32_t(ar[2 * p + t]) * int32_t(w[2 * c + t]);
    }
    std::memcpy(acc + r * NR, sums, sizeof sums);
  }
}

#if DFQVIT_X86
inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int MR>
__attribute__((target("avx2"))) void micro_u8_avx2(const uint8_t* a, int64_t lda, const int8_t* panel,
                                                   int64_t quads, int32_t* acc) {
  __m256i sum[MR];
  for (int r = 0; r < MR; ++r) sum[r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t q = 0;
  for (; q + 4 <= quads; q += 4) {
    const int8_t* w = panel + q * 32;
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
    const __m256i w2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64));
    const __m256i w3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 96));
    for (int r = 0; r < MR; ++r) {
      const uint8_t* ar = a + r * lda + 4 * q;
      __m256i t = _mm256_maddubs_epi16(_mm256_set1_epi32(load_i32(ar)), w0);
      t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_set1_epi32(load_i32(ar + 4)), w1));
      t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_set1_epi32(load_i32(ar + 8)), w2));
      t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_set1_epi32(load_i32(ar + 12)), w3));
      sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(t, ones));
    }
  }
  for (; q < quads; ++q) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * 32));
    for (int r = 0; r < MR; ++r) {
      const __m256i t = _mm256_maddubs_epi16(_mm256_set1_epi32(load_i32(a + r * lda + 4 * q)), w0);
      sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(t, ones));
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * 8), sum[r]);
}

template <int MR>
__attribute__((target("avx2"))) void micro_s16_avx2(const int16_t* a, int64_t lda, const int16_t* panel,
                                                    int64_t pairs, int32_t* acc) {
  __m256i sum[MR];
  for (int r = 0; r < MR; ++r) sum[r] = _mm256_setzero_si256();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + p * 16));
    for (int r = 0; r < MR; ++r)
      sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_set1_epi32(load_i32(a + r * lda + 2 * p)), w));
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * 8), sum[r]);
}

template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void micro_u8_vnni(const uint8_t* a, int64_t lda,
                                                                          const int8_t* panel, int64_t quads,
                                                                          int32_t* acc) {
  __m512i sum[MR];
  for (int r = 0; r < MR; ++r) sum[r] = _mm512_setzero_si512();
  for (int64_t q = 0; q < quads; ++q) {
    const __m512i w = _mm512_loadu_si512(panel + q * 64);
    for (int r = 0; r < MR; ++r)
      sum[r] = _mm512_dpbusd_epi32(sum[r], _mm512_set1_epi32(load_i32(a + r * lda + 4 * q)), w);
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_si512(acc + r * 16, sum[r]);
}
#endif

// ---------------------------------------------------------------------------------------------------
// Operands
// ---------------------------------------------------------------------------------------------------

int64_t padded_k(int64_t k, int64_t group_k) { return (k + group_k - 1) / group_k * group_k; }

// Codes of one packed row (storage 3 or 4) into out[0..k).
void unpack_row(const uint8_t* in, int storage_bits, int64_t k, int64_t group_k, uint8_t* out) {
  for (int64_t g = 0; g * group_k < k; ++g) {
    const int64_t base = g * group_k;
    if (storage_bits == 4) {
      const uint8_t* bytes = in + g * group_k / 2;
      for (int64_t j = 0; j < group_k / 2; ++j) {
        if (base + j < k) out[base + j] = bytes[j] & 0xF;
        if (base + group_k / 2 + j < k) out[base + group_k / 2 + j] = bytes[j] >> 4;
      }
    } else {
      const uint8_t* grp = in + g * (3 * group_k / 8);
      for (int64_t p = 0; p < group_k && base + p < k; ++p) {
        const uint8_t low = (grp[p % (group_k / 4)] >> (2 * (p / (group_k / 4)))) & 0x3;
        const uint8_t high = (grp[group_k / 4 + p % (group_k / 8)] >> (p / (group_k / 8))) & 0x1;
        out[base + p] = static_cast<uint8_t>(low | (high << 2));
      }
    }
  }
}

struct WeightPanels {
  int nr = 8;
  int lane = 4;               // K positions per 32-bit lane: 4 (int8 panel) or 2 (int16 panel)
  int64_t steps = 0;          // quads or pairs per panel
  int64_t num_panels = 0;
  std::vector<int8_t> i8;     // [panel][step][nr][4]
  std::vector<int16_t> i16;   // [panel][step][nr][2]
  std::vector<int32_t> col_sums;  // (num_panels * nr) sum_k (W - w_zero) over the true K
};

WeightPanels unpack_panels(const at::Tensor& w, const at::Tensor& w_zero, int storage_bits, int64_t k,
                           int64_t group_k, int nr) {
  WeightPanels p;
  const int64_t n = w.size(0);
  p.nr = nr;
  p.lane = storage_bits == 8 ? 2 : 4;
  p.steps = (k + p.lane - 1) / p.lane;
  p.num_panels = (n + nr - 1) / nr;
  const int64_t panel_elems = p.steps * nr * p.lane;
  if (storage_bits == 8) p.i16.assign(p.num_panels * panel_elems, 0);
  else p.i8.assign(p.num_panels * panel_elems, 0);
  p.col_sums.assign(p.num_panels * nr, 0);
  const int32_t* zero = w_zero.data_ptr<int32_t>();
  const int64_t row_bytes = w.size(1);
  at::parallel_for(0, p.num_panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> centered(k);
    std::vector<uint8_t> codes(k);
    for (int64_t panel = begin; panel < end; ++panel) {
      for (int c = 0; c < nr; ++c) {
        const int64_t row = panel * nr + c;
        if (row >= n) break;
        if (storage_bits == 8) {
          const int8_t* src = w.data_ptr<int8_t>() + row * row_bytes;
          for (int64_t i = 0; i < k; ++i) centered[i] = int32_t(src[i]) - zero[row];
        } else {
          unpack_row(w.data_ptr<uint8_t>() + row * row_bytes, storage_bits, k, group_k, codes.data());
          for (int64_t i = 0; i < k; ++i) centered[i] = int32_t(codes[i]) - zero[row];
        }
        int32_t total = 0;
        for (int64_t i = 0; i < k; ++i) {
          total += centered[i];
          const int64_t at = panel * panel_elems + (i / p.lane) * nr * p.lane + c * p.lane + i % p.lane;
          if (storage_bits == 8) p.i16[at] = static_cast<int16_t>(centered[i]);
          else p.i8[at] = static_cast<int8_t>(centered[i]);
        }
        p.col_sums[panel * nr + c] = total;
      }
    }
  });
  return p;
}

// ---------------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------------

constexpr int kMR = 4;           // rows per micro-kernel call
constexpr int64_t kTileRows = 64;
constexpr int64_t kTilePanels = 4;

template <typename MicroFull, typename MicroRows>
void run_tiles(int64_t m, const WeightPanels& p, const Epilogue& ep, Isa isa, MicroFull micro_full,
               MicroRows micro_rows) {
  const int64_t row_tiles = (m + kTileRows - 1) / kTileRows;
  const int64_t panel_tiles = (p.num_panels + kTilePanels - 1) / kTilePanels;
  at::parallel_for(0, row_tiles * panel_tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[kMR * kMaxNR];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t m0 = (tile / panel_tiles) * kTileRows, m1 = std::min(m, m0 + kTileRows);
      const int64_t p0 = (tile % panel_tiles) * kTilePanels, p1 = std::min(p.num_panels, p0 + kTilePanels);
      for (int64_t panel = p0; panel < p1; ++panel) {
        const int64_t col0 = panel * p.nr;
        const int width = static_cast<int>(std::min<int64_t>(p.nr, ep.n - col0));
        for (int64_t row = m0; row < m1; row += kMR) {
          const int rows = static_cast<int>(std::min<int64_t>(kMR, m1 - row));
          if (rows == kMR) micro_full(row, panel, acc);
          else micro_rows(row, rows, panel, acc);
#if DFQVIT_X86
          if (isa != Isa::kScalar) {
            epilogue_avx2(ep, acc, p.nr, row, rows, col0, width);
            continue;
          }
#endif
          epilogue_scalar(ep, acc, p.nr, row, rows, col0, width);
        }
      }
    }
  });
}

at::Tensor as_f32_vector(const c10::optional<at::Tensor>& t, int64_t padded) {
  at::Tensor out = at::zeros({padded}, at::kFloat);
  if (t.has_value()) out.narrow(0, 0, t->size(0)).copy_(t->to(at::kFloat));
  return out;
}

at::Tensor native_qgemm(const at::Tensor& a_in, double a_scale, int64_t a_zero, const at::Tensor& w_packed,
                        const at::Tensor& w_scale, const at::Tensor& w_zero_in, const at::Tensor& w_col_sums,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
                        int64_t storage_bits, int64_t k, int64_t group_k, bool gelu, c10::optional<double> out_scale,
                        int64_t out_zero, int64_t out_qmin, int64_t out_qmax, at::ScalarType out_dtype) {
  (void)w_col_sums;  // recomputed from the codes (the reference does not use it either)
  TORCH_CHECK(a_in.dim() == 2 && a_in.scalar_type() == at::kChar && a_in.size(1) == k,
              "dfqvit native qgemm: a must be int8 (M, K=", k, "), got ", a_in.sizes(), " ", a_in.scalar_type());
  TORCH_CHECK(storage_bits == 3 || storage_bits == 4 || storage_bits == 8, "dfqvit native qgemm: storage_bits=",
              storage_bits, "; allowed 3, 4, 8.");
  const Isa isa = active_isa();
  const at::Tensor a = a_in.contiguous(), w = w_packed.contiguous(), w_zero = w_zero_in.to(at::kInt).contiguous();
  const int64_t m = a.size(0), n = w.size(0);
  const bool wide = storage_bits == 8;
  const int nr = (isa == Isa::kAvx512Vnni && !wide) ? 16 : 8;
  const WeightPanels p = unpack_panels(w, w_zero, static_cast<int>(storage_bits), k, group_k, nr);
  const int64_t np = p.num_panels * nr, steps = p.steps, ld = steps * p.lane;

  // Epilogue vectors, padded to whole panels.
  at::Tensor row_scale = as_f32_vector(w_scale, np);
  row_scale.narrow(0, 0, n).mul_(at::scalar_tensor(static_cast<float>(a_scale), at::kFloat));
  const at::Tensor bias_f = bias.has_value() ? as_f32_vector(bias, np) : at::Tensor();
  std::vector<int32_t> correction(np, 0);
  if (!wide)
    for (int64_t c = 0; c < np; ++c) correction[c] = (128 + static_cast<int32_t>(a_zero)) * p.col_sums[c];
  at::Tensor res;
  if (residual.has_value()) {
    res = residual->to(at::kFloat);
    if (res.stride(1) != 1) res = res.contiguous();
  }
  const bool requant = out_scale.has_value();
  at::Tensor out = at::empty({m, n}, requant ? at::kChar : at::kFloat);

  Epilogue ep{row_scale.data_ptr<float>(), correction.data(), bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
              gelu, res.defined() ? res.data_ptr<float>() : nullptr, res.defined() ? res.stride(0) : 0, requant,
              static_cast<float>(out_scale.value_or(1.0)), static_cast<float>(out_zero), static_cast<float>(out_qmin),
              static_cast<float>(out_qmax), requant ? nullptr : out.data_ptr<float>(),
              requant ? out.data_ptr<int8_t>() : nullptr, n};
  if (m == 0) return requant ? out : out.to(out_dtype);

  const int8_t* a8 = a.data_ptr<int8_t>();
  const int64_t panel_elems = steps * nr * p.lane;
  if (!wide) {
    std::vector<uint8_t> au(m * ld, 0);  // a + 128, K padded to quads
    at::parallel_for(0, m, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        for (int64_t j = 0; j < k; ++j) au[i * ld + j] = static_cast<uint8_t>(a8[i * k + j] ^ 0x80);
    });
    const uint8_t* ap = au.data();
    const int8_t* wp = p.i8.data();
    auto rows_scalar = [&](int64_t row, int rows, int64_t panel, int32_t* acc) {
      if (nr == 16) micro_u8_scalar<16>(ap + row * ld, ld, rows, wp + panel * panel_elems, steps, acc);
      else micro_u8_scalar<8>(ap + row * ld, ld, rows, wp + panel * panel_elems, steps, acc);
    };
#if DFQVIT_X86
    if (isa == Isa::kAvx512Vnni) {
      auto full = [&](int64_t row, int64_t panel, int32_t* acc) {
        micro_u8_vnni<kMR>(ap + row * ld, ld, wp + panel * panel_elems, steps, acc);
      };
      auto rows_fn = [&](int64_t row, int rows, int64_t panel, int32_t* acc) {
        for (int r = 0; r < rows; ++r)
          micro_u8_vnni<1>(ap + (row + r) * ld, ld, wp + panel * panel_elems, steps, acc + r * 16);
      };
      run_tiles(m, p, ep, isa, full, rows_fn);
    } else if (isa == Isa::kAvx2) {
      auto full = [&](int64_t row, int64_t panel, int32_t* acc) {
        micro_u8_avx2<kMR>(ap + row * ld, ld, wp + panel * panel_elems, steps, acc);
      };
      auto rows_fn = [&](int64_t row, int rows, int64_t panel, int32_t* acc) {
        for (int r = 0; r < rows; ++r)
          micro_u8_avx2<1>(ap + (row + r) * ld, ld, wp + panel * panel_elems, steps, acc + r * 8);
      };
      run_tiles(m, p, ep, isa, full, rows_fn);
    } else
#endif
    {
      auto full = [&](int64_t row, int64_t panel, int32_t* acc) { rows_scalar(row, kMR, panel, acc); };
      run_tiles(m, p, ep, isa, full, rows_scalar);
    }
  } else {
    std::vector<int16_t> as(m * ld, 0);  // a - a_zero, K padded to pairs
    at::parallel_for(0, m, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        for (int64_t j = 0; j < k; ++j) as[i * ld + j] = static_cast<int16_t>(a8[i * k + j] - a_zero);
    });
    const int16_t* ap = as.data();
    const int16_t* wp = p.i16.data();
    auto rows_scalar = [&](int64_t row, int rows, int64_t panel, int32_t* acc) {
      micro_s16_scalar<8>(ap + row * ld, ld, rows, wp + panel * panel_elems, steps, acc);
    };
#if DFQVIT_X86
    if (isa != Isa::kScalar) {
      auto full = [&](int64_t row, int64_t panel, int32_t* acc) {
        micro_s16_avx2<kMR>(ap + row * ld, ld, wp + panel * panel_elems, steps, acc);
      };
      auto rows_fn = [&](int64_t row, int rows, int64_t panel, int32_t* acc) {
        for (int r = 0; r < rows; ++r)
          micro_s16_avx2<1>(ap + (row + r) * ld, ld, wp + panel * panel_elems, steps, acc + r * 8);
      };
      run_tiles(m, p, ep, isa, full, rows_fn);
    } else
#endif
    {
      auto full = [&](int64_t row, int64_t panel, int32_t* acc) { rows_scalar(row, kMR, panel, acc); };
      run_tiles(m, p, ep, isa, full, rows_scalar);
    }
  }
  if (requant || out_dtype == at::kFloat) return out;
  return out.to(out_dtype);  // fp16 / bf16: the reference's y.to(out_dtype), round to nearest even
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dfqvit, m) {
  m.def("native_qgemm(Tensor a, float a_scale, int a_zero, Tensor w_packed, Tensor w_scale, Tensor w_zero, "
        "Tensor w_col_sums, Tensor? bias, Tensor? residual, int storage_bits, int k, int group_k, bool gelu, "
        "float? out_scale, int out_zero, int out_qmin, int out_qmax, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(dfqvit, CPU, m) { m.impl("native_qgemm", &native_qgemm); }

}  // namespace dfqvit
