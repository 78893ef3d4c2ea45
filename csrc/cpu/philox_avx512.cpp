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

inline __attribute__((always_inline)) Z4 operator^(uint32_t a, const Z4& b) { return b ^ a; }

inline __attribute__((always_inline)) void broadcast(Z4& dst, uint32_t v) {
  for (int k = 0; k < 4; ++k) dst.v[k] = _mm512_set1_epi32(static_cast<int>(v));
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
    // c1 (j's high word), c2 and c3 (the offset) are the same in all lanes.
    Z4 c0, c1, c2, c3;
    for (int k = 0; k < 4; ++k)
      c0.v[k] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j0 + g + 16 * k)), lane);
    philox_rounds_uniform(c0, c1, c2, c3, static_cast<uint32_t>(j0 >> 32),
                          static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    // Words in element order: 4x4 transposes inside each 128-bit lane (r_q
    // then holds group 4L + q in lane L), then a 4x4 transpose of the 128-bit
    // lanes, so that out[m] holds groups 4m .. 4m + 3.
    for (int k = 0; k < 4; ++k) {
      const __m512i a = _mm512_unpacklo_epi32(c0.v[k], c1.v[k]);
      const __m512i b = _mm512_unpackhi_epi32(c0.v[k], c1.v[k]);
      const __m512i c = _mm512_unpacklo_epi32(c2.v[k], c3.v[k]);
      const __m512i d = _mm512_unpackhi_epi32(c2.v[k], c3.v[k]);
      const __m512i r0 = _mm512_unpacklo_epi64(a, c), r1 = _mm512_unpackhi_epi64(a, c);
      const __m512i r2 = _mm512_unpacklo_epi64(b, d), r3 = _mm512_unpackhi_epi64(b, d);
      const __m512i lo01 = _mm512_shuffle_i32x4(r0, r1, 0x44);  // r0.0 r0.1 r1.0 r1.1
      const __m512i lo23 = _mm512_shuffle_i32x4(r2, r3, 0x44);  // r2.0 r2.1 r3.0 r3.1
      const __m512i hi01 = _mm512_shuffle_i32x4(r0, r1, 0xEE);  // r0.2 r0.3 r1.2 r1.3
      const __m512i hi23 = _mm512_shuffle_i32x4(r2, r3, 0xEE);  // r2.2 r2.3 r3.2 r3.3
      __m512i* out = reinterpret_cast<__m512i*>(words + 4 * (g + 16 * k));
      _mm512_storeu_si512(out + 0, _mm512_shuffle_i32x4(lo01, lo23, 0x88));
      _mm512_storeu_si512(out + 1, _mm512_shuffle_i32x4(lo01, lo23, 0xDD));
      _mm512_storeu_si512(out + 2, _mm512_shuffle_i32x4(hi01, hi23, 0x88));
      _mm512_storeu_si512(out + 3, _mm512_shuffle_i32x4(hi01, hi23, 0xDD));
    }
  }
}

}  // namespace pege
#endif
