// The CPU kernels' Philox words, compiled for AVX-512 and chosen at run time.
// The rounds are pege_math.h's philox_rounds; only the lane type is new: four
// zmm registers (64 counters, several chains in flight), with the 32x32->64
// products as one vpmuludq per even/odd half, which GCC's generic vector
// code turns into a full 64-bit multiply emulation.
// This file includes no ATen header, so nothing compiled here for AVX-512
// can be shared (via inline functions) with code that runs elsewhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f")
#include <immintrin.h>

#include "../pege_math.h"
#include "philox_avx512.h"

namespace pege {
namespace {

struct Z4 {
  __m512i v[4];
};

inline __attribute__((always_inline)) Z4 operator^(const Z4& a, const Z4& b) {
  Z4 r;
  for (int k = 0; k < 4; ++k) r.v[k] = _mm512_xor_si512(a.v[k], b.v[k]);
  return r;
}

inline __attribute__((always_inline)) Z4 operator^(const Z4& a, uint32_t b) {
  Z4 r;
  const __m512i bv = _mm512_set1_epi32(static_cast<int>(b));
  for (int k = 0; k < 4; ++k) r.v[k] = _mm512_xor_si512(a.v[k], bv);
  return r;
}

inline __attribute__((always_inline)) void mulhilo32(uint32_t m, const Z4& a, Z4& hi, Z4& lo) {
  const __m512i mv = _mm512_set1_epi64(m);
  for (int k = 0; k < 4; ++k) {
    const __m512i even = _mm512_mul_epu32(a.v[k], mv);
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v[k], 32), mv);
    lo.v[k] = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    hi.v[k] = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }
}

}  // namespace

void philox_words_avx512(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                         uint64_t offset) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = 0; g < groups; g += 64) {
    Z4 c0, c1, c2, c3;
    for (int k = 0; k < 4; ++k) {
      const uint64_t base = j0 + g + 16 * k;
      // 16 consecutive group indices; the high word changes at most once
      // (at a 2^32 boundary), which the per-lane compare below handles.
      const __m512i lo = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)), lane);
      const __mmask16 wrapped = _mm512_cmplt_epu32_mask(lo, _mm512_set1_epi32(static_cast<int>(base)));
      c0.v[k] = lo;
      c1.v[k] = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(base >> 32)), wrapped,
                                      _mm512_set1_epi32(static_cast<int>(base >> 32)),
                                      _mm512_set1_epi32(1));
      c2.v[k] = _mm512_set1_epi32(static_cast<int>(offset));
      c3.v[k] = _mm512_set1_epi32(static_cast<int>(offset >> 32));
    }
    philox_rounds(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    // 4x4 transposes inside each 128-bit lane: r_q holds groups 4L + q.
    for (int k = 0; k < 4; ++k) {
      const __m512i a = _mm512_unpacklo_epi32(c0.v[k], c1.v[k]);
      const __m512i b = _mm512_unpackhi_epi32(c0.v[k], c1.v[k]);
      const __m512i c = _mm512_unpacklo_epi32(c2.v[k], c3.v[k]);
      const __m512i d = _mm512_unpackhi_epi32(c2.v[k], c3.v[k]);
      const __m512i r[4] = {_mm512_unpacklo_epi64(a, c), _mm512_unpackhi_epi64(a, c),
                            _mm512_unpacklo_epi64(b, d), _mm512_unpackhi_epi64(b, d)};
      uint32_t* out = words + 4 * (g + 16 * k);
      alignas(64) uint32_t tmp[4][16];
      for (int q = 0; q < 4; ++q) _mm512_store_si512(tmp[q], r[q]);
      for (int l = 0; l < 4; ++l)
        for (int q = 0; q < 4; ++q)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 4 * (4 * l + q)),
                           _mm_load_si128(reinterpret_cast<const __m128i*>(&tmp[q][4 * l])));
    }
  }
}

}  // namespace pege
#endif
