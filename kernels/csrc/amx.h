// AMX tiles (Sapphire Rapids and later), shared by the GEMM (qgemm_cpu.cpp) and the attention's P.V
// (attention_cpu.cpp): every tile is configured as 16 rows x 64 bytes, the most one tile holds. Code using them is
// compiled per function with __attribute__((target("amx-tile,amx-int8"))) and runs only when cpu_isa.cpp found the
// CPU's AMX-INT8 and the kernel's leave to use it (Isa::kAmxInt8).
#pragma once

#include <cstdint>

#include "portable_math.h"  // DFQVIT_X86, immintrin.h

namespace dfqvit {

constexpr int kAmxRows = 16, kAmxBytes = 64;

#if DFQVIT_X86
struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline TileConfig amx_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = kAmxBytes;
    cfg.rows[t] = kAmxRows;
  }
  return cfg;
}
// In static storage: GCC 12 models ldtilecfg as reading only part of its operand and dropped the stores of a stack
// copy's shapes (the instruction then faulted).
inline const TileConfig kAmxTileConfig = amx_tile_config();

// The same shapes, and tiles 6 and 7 shaped for the last K chunk of `tail` bytes (a multiple of 4, 0 < tail < 64):
// tile 6 an A tile of 16 rows x tail bytes, tile 7 a B tile of tail / 4 rows x 64 bytes.
__attribute__((target("amx-tile"))) inline void amx_configure_with_tail(int tail) {
  TileConfig cfg = amx_tile_config();
  cfg.colsb[6] = static_cast<uint16_t>(tail);
  cfg.rows[7] = static_cast<uint8_t>(tail / 4);
  asm volatile("" : : "r"(&cfg) : "memory");  // the stores above must reach memory: see kAmxTileConfig
  _tile_loadconfig(&cfg);
}

// Tile shapes are per thread: loaded by the thread that is about to use the tiles, at the start of each unit of
// work (another library, e.g. oneDNN inside torch, may have configured its own between our calls).
__attribute__((target("amx-tile"))) inline void amx_configure() { _tile_loadconfig(&kAmxTileConfig); }
#endif

}  // namespace dfqvit
