// Runs Kiln's C++ kernels under AddressSanitizer on awkward sizes (tails of every length,
// one-row batches, hidden sizes not a multiple of 16): any out-of-bounds access aborts.
#include <cstdio>
#include <random>
#include <vector>

#include "kiln.h"

int main() {
  std::mt19937 g(0);
  std::normal_distribution<float> n(0, 1);
  auto vec = [&](size_t k) { std::vector<float> v(k); for (auto& x : v) x = n(g); return v; };
  int cases = 0;
  for (int64_t H : {1, 7, 16, 17, 33}) {
    for (int64_t B : {1, 2, 5, 7}) {
      const int64_t T = 3;
      for (int threads : {1, 2}) {
        auto gx = vec(T * B * 4 * H), w = vec(4 * H * H), h0 = vec(B * H), c0 = vec(B * H);
        std::vector<float> y(T * B * H), hn(B * H), cn(B * H);
        auto p = kiln::pack_recurrent_weight(w.data(), 4, H);
        // time-major (T, B, .) and batch-first (B, T, .) seen as strided (T, B, .) views
        const kiln::SeqStrides tm4{B * 4 * H, 4 * H, B * H, H}, bf4{4 * H, T * 4 * H, H, T * H};
        const kiln::SeqStrides tm3{B * 3 * H, 3 * H, B * H, H}, bf3{3 * H, T * 3 * H, H, T * H};
        auto gx3 = vec(T * B * 3 * H), w3 = vec(3 * H * H), b3 = vec(3 * H);
        auto p3 = kiln::pack_recurrent_weight(w3.data(), 3, H);
        if (kiln::recurrence_supported()) {
          for (const auto& st : {tm4, bf4})
            kiln::lstm_recurrence(gx.data(), p.data(), h0.data(), c0.data(), y.data(), hn.data(), cn.data(), T, B, H,
                                  st, threads);
          for (const auto& st : {tm3, bf3})
            kiln::gru_recurrence(gx3.data(), p3.data(), b3.data(), h0.data(), y.data(), hn.data(), T, B, H, st,
                                 threads);
          // the fused layers, with and without biases, input sizes of every tail
          for (int64_t I : {1, 5, 16}) {
            auto x = vec(T * B * I), wi4 = vec(4 * H * I), wi3 = vec(3 * H * I), b4 = vec(4 * H);
            const kiln::SeqStrides tmx{B * I, I, B * H, H}, bfx{I, T * I, H, T * H};
            for (bool bias : {true, false}) {
              auto q4 = kiln::pack_layer_weight(wi4.data(), w.data(), bias ? b4.data() : nullptr,
                                                bias ? b4.data() : nullptr, 4, I, H);
              auto q3 = kiln::pack_layer_weight(wi3.data(), w3.data(), bias ? b3.data() : nullptr,
                                                bias ? b3.data() : nullptr, 3, I, H);
              for (const auto& st : {tmx, bfx}) {
                kiln::lstm_layer(x.data(), q4.data(), h0.data(), c0.data(), y.data(), hn.data(), cn.data(), T, B, I,
                                 H, st, threads);
                kiln::gru_layer(x.data(), q3.data(), h0.data(), y.data(), hn.data(), T, B, I, H, st, threads);
              }
            }
          }
        }
        std::vector<float> gh(B * 4 * H), ho(B * H), co(B * H);
        kiln::lstm_cell(gx.data(), gh.data(), c0.data(), ho.data(), co.data(), B, H);
        std::vector<float> gh3(B * 3 * H);
        kiln::gru_cell(gx3.data(), gh3.data(), b3.data(), h0.data(), ho.data(), B, H);
        ++cases;
      }
    }
  }
  // bf16 LSTM / GRU layers (AVX512-BF16 dot products; AMX where present): exact-size buffers,
  // odd input sizes (x copied padded) and even ones (x read in place), row groups and hidden
  // blocks with tails, time-major and batch-first views
  for (kiln::RnnPath path : {kiln::RnnPath::dot, kiln::RnnPath::amx}) {
    if (path == kiln::RnnPath::dot ? !kiln::rnn_dot_bf16_supported() : !kiln::rnn_amx_supported()) continue;
    for (int64_t H : {1, 7, 16, 17, 33})
      for (int64_t B : {1, 5, 7, 13})
        for (int64_t I : {1, 5, 16}) {
          const int64_t T = 3;
          auto bits = [&](size_t k) {
            std::vector<uint16_t> v(k);
            for (auto& e : v) e = static_cast<uint16_t>(0x3f00 + (g() & 0xff));  // bf16 in [0.5, 1)
            return v;
          };
          auto x = bits(T * B * I), h0 = bits(B * H);
          auto c0 = vec(B * H);
          std::vector<uint16_t> y(T * B * H), hn(B * H);
          std::vector<float> cn(B * H);
          const kiln::SeqStrides tmx{B * I, I, B * H, H}, bfx{I, T * I, H, T * H};
          for (int64_t G : {4, 3}) {
            auto wi = vec(G * H * I), wh = vec(G * H * H), bi = vec(G * H), bh = vec(G * H);
            auto pw = kiln::rnn_amx_pack(wi.data(), wh.data(), bi.data(), bh.data(), G, I, H);
            for (const auto& st : {tmx, bfx})
              for (int threads : {1, 2}) {
                if (G == 4)
                  kiln::lstm_layer_bf16(path, x.data(), pw, h0.data(), c0.data(), y.data(), hn.data(), cn.data(), T,
                                        B, st, threads);
                else
                  kiln::gru_layer_bf16(path, x.data(), pw, h0.data(), y.data(), hn.data(), T, B, st, threads);
                ++cases;
              }
          }
        }
  }
  // Winograd transforms, fp32 and bf16: exact-size buffers, channel tails, tiles overhanging
  // the image (odd sizes), padding 0 and 1, two images
  for (int64_t m : {2, 4})
    for (int64_t C : {3, 16, 21})
      for (int64_t pad : {0, 1}) {
        const int64_t N = 2, H = 7, W = 6, K = 5, OH = H + 2 * pad - 2, OW = W + 2 * pad - 2;
        const kiln::WinogradShape s{N, H, W, C, K, OH, OW, pad, pad, m};
        const int64_t T = kiln::winograd_tiles(s), P = (m + 2) * (m + 2);
        auto x = vec(N * H * W * C), Mt = vec(P * T * K), bias = vec(K), res = vec(N * OH * OW * K);
        std::vector<float> V(P * T * C), y(N * OH * OW * K);
        std::vector<uint16_t> xb(x.size(), 0x3f80), Vb(V.size()), Mb(Mt.size(), 0x3f80), yb(y.size()),
            rb(res.size(), 0x3f80);
        for (int threads : {1, 2}) {
          if (kiln::winograd_supported()) {
            kiln::winograd_input(x.data(), V.data(), s, threads);
            kiln::winograd_output(Mt.data(), y.data(), bias.data(), res.data(), true, s, threads);
          }
          if (kiln::winograd_bf16_supported()) {
            kiln::winograd_input_bf16(xb.data(), Vb.data(), s, threads);
            kiln::winograd_output_bf16(Mb.data(), yb.data(), bias.data(), rb.data(), true, s, threads);
          }
          ++cases;
        }
      }
  // max-pool: exact-size buffers, channel tails (C % 16 != 0), windows hanging over every edge
  if (kiln::max_pool_supported()) {
    for (int64_t C : {3, 16, 21})
      for (int64_t k : {1, 3})
        for (int64_t s : {1, 2}) {
          const int64_t N = 2, H = 7, W = 5, p = k / 2;
          const int64_t OH = (H + 2 * p - k + s - 1) / s + 1, OW = (W + 2 * p - k + s - 1) / s + 1;  // ceil
          kiln::PoolShape ps{N, H, W, C, OH, OW, k, k, s, s, p, p, 1, 1};
          auto x = vec(N * H * W * C);
          std::vector<float> y(N * OH * OW * C);
          std::vector<uint16_t> xb(x.size()), yb(y.size());
          std::vector<uint8_t> xu(x.size()), yu(y.size());
          for (int threads : {1, 2}) {
            kiln::max_pool2d_nhwc(x.data(), y.data(), ps, false, threads);
            kiln::max_pool2d_nhwc(xb.data(), yb.data(), ps, true, threads);
            if (kiln::max_pool_u8_supported()) kiln::max_pool2d_nhwc_u8(xu.data(), yu.data(), ps, threads);
          }
          ++cases;
        }
  }
  // per-tensor uint8 quantize / dequantize: exact-size buffers, vector tails
  for (int64_t n : {1, 15, 16, 17, 70000}) {
    auto x = vec(n);
    std::vector<uint8_t> q(n);
    std::vector<float> back(n);
    for (int threads : {1, 2}) {
      kiln::quantize_u8(x.data(), q.data(), n, 0.05, 128, threads);
      kiln::dequantize_u8(q.data(), back.data(), n, 0.05, 128, threads);
    }
    ++cases;
  }
  // Winograd weight transform: filter counts below, at and past a block of 16
  for (int64_t K : {1, 16, 37})
    for (int64_t m : {2, 4})
      for (int threads : {1, 2}) {
        auto w = vec(K * 5 * 9);
        std::vector<float> U((m + 2) * (m + 2) * 5 * K);
        kiln::winograd_weight(w.data(), U.data(), K, 5, m, threads);
        ++cases;
      }
  // CRC-32: exact-size heap buffers of every length around the 64-byte fold and 16-byte tails
  for (size_t n = 0; n < 200; ++n) {
    std::vector<uint8_t> b(n);
    for (auto& x : b) x = static_cast<uint8_t>(g());
    const uint32_t whole = kiln::crc32(b.data(), n, 0);
    if (kiln::crc32(b.data() + n / 2, n - n / 2, kiln::crc32(b.data(), n / 2, 0)) != whole) {
      std::printf("crc32 split mismatch at %zu\n", n);
      return 1;
    }
    ++cases;
  }
  std::printf("asan ok: %d kernel cases\n", cases);
  return 0;
}
