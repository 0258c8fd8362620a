#include <algorithm>
#include <numeric>
#include <stdexcept>

#include "kiln.h"

namespace kiln {

MemoryPlan plan_memory(const std::vector<int64_t>& sizes, const std::vector<int64_t>& first,
                       const std::vector<int64_t>& last, int64_t alignment) {
  const size_t n = sizes.size();
  if (first.size() != n || last.size() != n)
    throw std::invalid_argument("plan_memory: sizes, first and last must have the same length");
  if (alignment <= 0 || (alignment & (alignment - 1)) != 0)
    throw std::invalid_argument("plan_memory: alignment must be a positive power of two");
  for (size_t i = 0; i < n; ++i) {
    if (sizes[i] < 0) throw std::invalid_argument("plan_memory: negative buffer size");
    if (first[i] > last[i]) throw std::invalid_argument("plan_memory: buffer dies before it is born");
  }
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return sizes[a] > sizes[b]; });

  MemoryPlan plan;
  plan.offsets.assign(n, -1);
  std::vector<size_t> placed;
  std::vector<std::pair<int64_t, int64_t>> live;  // (offset, end) of lifetime-overlapping buffers
  for (size_t idx : order) {
    const int64_t size = (sizes[idx] + alignment - 1) / alignment * alignment;
    live.clear();
    for (size_t p : placed)
      if (first[p] <= last[idx] && first[idx] <= last[p])
        live.emplace_back(plan.offsets[p], plan.offsets[p] + (sizes[p] + alignment - 1) / alignment * alignment);
    std::sort(live.begin(), live.end());
    int64_t offset = 0;
    for (const auto& iv : live) {
      if (iv.first - offset >= size) break;  // fits in the gap before this buffer
      offset = std::max(offset, iv.second);
    }
    plan.offsets[idx] = offset;
    plan.arena_bytes = std::max(plan.arena_bytes, offset + size);
    placed.push_back(idx);
  }
  return plan;
}

}  // namespace kiln
