// AMX tile configuration shared by Kiln's tile kernels (the int8 GEMM, the bf16 attention).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace kiln {

#if defined(__AMX_TILE__)
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// All eight tiles 16 rows x 64 bytes, loaded for the calling thread.
inline void load_full_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC's _tile_loadconfig names only the config's first 8 bytes as its memory operand, so
  // without a barrier the rows/colsb stores above count as dead and are dropped (the first
  // tile instruction then faults)
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}
#endif

}  // namespace kiln
