// Kiln's C++ kernels and runtime helpers, exposed to Python as kiln._C.
#pragma once
#include <cstdint>
#include <vector>

namespace kiln {

// One fused LSTM step over a batch: gates [B, 4H] (i, f, g, o blocks, pre-activation,
// biases already added), c [B, H] -> h_out, c_out [B, H]. c_out may alias c.
void lstm_cell(const float* gates, const float* c, float* h_out, float* c_out, int64_t batch,
               int64_t hidden, int64_t gates_stride, int64_t h_stride);

// One fused GRU step: gx = x W_ih^T + b_ih and gh = h W_hh^T + b_hh, both [B, 3H] (r, z, n).
// h_out may alias h.
void gru_cell(const float* gx, const float* gh, const float* h, float* h_out, int64_t batch,
              int64_t hidden, int64_t gx_stride, int64_t h_stride, int64_t h_out_stride);

struct MemoryPlan {
  std::vector<int64_t> offsets;  // byte offset of each buffer in the arena
  int64_t arena_bytes = 0;       // total arena size
};

// Static buffer assignment: buffers with overlapping lifetimes [first, last] (step indices,
// inclusive) never share bytes. Greedy by size, largest first, each placed at the lowest
// offset that fits between the live buffers already placed (the TFLite arena strategy).
MemoryPlan plan_memory(const std::vector<int64_t>& sizes, const std::vector<int64_t>& first,
                       const std::vector<int64_t>& last, int64_t alignment);

}  // namespace kiln
