// How Kiln's packed-weight GEMMs (int8, bf16) share a call between threads.
#pragma once
#include <algorithm>
#include <cstdint>

namespace kiln {

// Splits the panels (columns) between threads when there are enough of them, else the rows.
// Column splits give each thread its own weight panels, which is what streams from memory.
struct Split {
  int threads;
  bool by_columns;
  int64_t blocks, panel_block, row_block;

  // Thread t's rows [m0, m1) and panels [p0, p1) (empty when m0 >= m1 or p0 >= p1).
  void range(int t, int64_t m, int64_t panels, int64_t& m0, int64_t& m1, int64_t& p0, int64_t& p1) const {
    const int64_t lo = blocks * t / threads, hi = blocks * (t + 1) / threads;
    m0 = 0, m1 = m, p0 = 0, p1 = panels;
    if (by_columns) {
      p0 = lo * panel_block;
      p1 = std::min(panels, hi * panel_block);
    } else {
      m0 = lo * row_block;
      m1 = std::min(m, hi * row_block);
    }
  }
};

inline Split plan_split(int threads, int64_t m, int64_t panels, int64_t panel_block, int64_t row_block) {
  const int64_t nblk = (panels + panel_block - 1) / panel_block, mblk = (m + row_block - 1) / row_block;
  const bool by_columns = nblk >= threads || nblk >= mblk;
  const int64_t blocks = by_columns ? nblk : mblk;
  return {static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks))), by_columns, blocks, panel_block,
          row_block};
}

}  // namespace kiln
