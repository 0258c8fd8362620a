// CRC-32 (the zlib / zip polynomial, bit-reflected 0xEDB88320) by carry-less multiplication:
// the checksum every weight of an artifact is verified with at load (kiln._C.crc32). zlib's
// table-driven loop handles a byte or two per cycle, so on a large model checking the weights
// took longer than reading them from the page cache; folding 64 bytes per iteration with
// PCLMULQDQ (Gopal et al., "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ
// Instruction", Intel 2009; the constants below are that paper's for this polynomial, as
// Chromium's zlib and the Linux kernel use them) runs at memory speed. The value is the same
// as zlib.crc32's, so artifacts written before read unchanged.

#include <cstddef>
#include <cstdint>

#ifdef __PCLMUL__
#include <immintrin.h>
#endif

#include "kiln.h"

namespace {

// The byte-at-a-time table, for the head and tail the folding loop does not cover (and for
// builds without PCLMULQDQ).
struct Table {
  uint32_t t[256];
  constexpr Table() : t() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
  }
};
constexpr Table kTable;

// ``crc`` is the running register (already inverted), as the folding code also takes it.
uint32_t bytewise(const uint8_t* p, size_t n, uint32_t crc) {
  for (size_t i = 0; i < n; ++i) crc = kTable.t[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return crc;
}

#ifdef __PCLMUL__
// ``n`` >= 64 and a multiple of 16; ``crc`` the inverted running register; returns the same.
uint32_t folded(const uint8_t* buf, size_t n, uint32_t crc) {
  alignas(16) static const uint64_t k1k2[] = {0x0154442bd4ull, 0x01c6e41596ull};
  alignas(16) static const uint64_t k3k4[] = {0x01751997d0ull, 0x00ccaa009eull};
  alignas(16) static const uint64_t k5k0[] = {0x0163cd6124ull, 0x0000000000ull};
  alignas(16) static const uint64_t poly[] = {0x01db710641ull, 0x01f7011641ull};
  auto load = [](const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); };

  __m128i x1 = load(buf), x2 = load(buf + 16), x3 = load(buf + 32), x4 = load(buf + 48);
  x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128(static_cast<int>(crc)));
  __m128i x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(k1k2));
  buf += 64;
  n -= 64;
  // four independent 128-bit lanes, each folded 512 bits forward per 64 bytes read
  while (n >= 64) {
    __m128i x5 = _mm_clmulepi64_si128(x1, x0, 0x00), x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
    __m128i x7 = _mm_clmulepi64_si128(x3, x0, 0x00), x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
    x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
    x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), load(buf));
    x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), load(buf + 16));
    x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), load(buf + 32));
    x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), load(buf + 48));
    buf += 64;
    n -= 64;
  }
  // the four lanes into one
  x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(k3k4));
  for (__m128i next : {x2, x3, x4}) {
    __m128i x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, next), x5);
  }
  // whole 16-byte blocks left
  while (n >= 16) {
    __m128i x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, load(buf)), x5);
    buf += 16;
    n -= 16;
  }
  // 128 bits to 64, then Barrett reduction to 32
  __m128i x2r = _mm_clmulepi64_si128(x1, x0, 0x10);
  const __m128i mask = _mm_setr_epi32(~0, 0, ~0, 0);
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2r);
  x0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(k5k0));
  x2r = _mm_srli_si128(x1, 4);
  x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, mask), x0, 0x00);
  x1 = _mm_xor_si128(x1, x2r);
  x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(poly));
  x2r = _mm_clmulepi64_si128(_mm_and_si128(x1, mask), x0, 0x10);
  x2r = _mm_clmulepi64_si128(_mm_and_si128(x2r, mask), x0, 0x00);
  x1 = _mm_xor_si128(x1, x2r);
  return static_cast<uint32_t>(_mm_extract_epi32(x1, 1));
}
#endif

}  // namespace

namespace kiln {

uint32_t crc32(const void* data, size_t n, uint32_t crc) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
#ifdef __PCLMUL__
  if (n >= 64) {
    const size_t body = n & ~static_cast<size_t>(15);
    c = folded(p, body, c);
    p += body;
    n -= body;
  }
#endif
  return ~bytewise(p, n, c);
}

}  // namespace kiln
