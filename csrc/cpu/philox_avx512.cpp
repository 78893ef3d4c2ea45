// The CPU kernels' Philox words on AVX-512 machines: 64 counters in four zmm
// registers (several chains in flight). GCC's generic vector code would turn
// the 32x32->64 products into a full 64-bit multiply emulation.
// This file includes no ATen header, so nothing compiled here for AVX-512
// can be shared (via inline functions) with code that runs elsewhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f")
#include <immintrin.h>

#include "philox_x86.h"

namespace pege {
namespace {

inline __attribute__((always_inline)) __m512i xor_v(__m512i a, __m512i b) {
  return _mm512_xor_si512(a, b);
}
inline __attribute__((always_inline)) __m512i set1(uint32_t v) {
  return _mm512_set1_epi32(static_cast<int>(v));
}
inline __attribute__((always_inline)) __m512i mul_even(__m512i a, __m512i b) {
  return _mm512_mul_epu32(a, b);
}
inline __attribute__((always_inline)) __m512i srli64(__m512i a, int n) {
  return _mm512_srli_epi64(a, n);
}
inline __attribute__((always_inline)) __m512i slli64(__m512i a, int n) {
  return _mm512_slli_epi64(a, n);
}
inline __attribute__((always_inline)) __m512i blend_odd(__m512i a, __m512i b) {
  return _mm512_mask_blend_epi32(0xAAAA, a, b);
}

}  // namespace
}  // namespace pege

#include "philox_simd.h"

namespace pege {

void philox_words_avx512(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                         uint64_t offset) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  philox_simd<__m512i, 4, 16>(
      j0, groups, seed, offset,
      [&](uint32_t first) { return _mm512_add_epi32(set1(first), lane); },
      [&](__m512i c0, __m512i c1, __m512i c2, __m512i c3, int64_t g) {
        // Words in element order: 4x4 transposes inside each 128-bit lane
        // (r_q then holds group 4L + q in lane L), then a 4x4 transpose of
        // the 128-bit lanes, so that out[m] holds groups 4m .. 4m + 3.
        const __m512i a = _mm512_unpacklo_epi32(c0, c1), b = _mm512_unpackhi_epi32(c0, c1);
        const __m512i c = _mm512_unpacklo_epi32(c2, c3), d = _mm512_unpackhi_epi32(c2, c3);
        const __m512i r0 = _mm512_unpacklo_epi64(a, c), r1 = _mm512_unpackhi_epi64(a, c);
        const __m512i r2 = _mm512_unpacklo_epi64(b, d), r3 = _mm512_unpackhi_epi64(b, d);
        const __m512i lo01 = _mm512_shuffle_i32x4(r0, r1, 0x44);  // r0.0 r0.1 r1.0 r1.1
        const __m512i lo23 = _mm512_shuffle_i32x4(r2, r3, 0x44);  // r2.0 r2.1 r3.0 r3.1
        const __m512i hi01 = _mm512_shuffle_i32x4(r0, r1, 0xEE);  // r0.2 r0.3 r1.2 r1.3
        const __m512i hi23 = _mm512_shuffle_i32x4(r2, r3, 0xEE);  // r2.2 r2.3 r3.2 r3.3
        __m512i* out = reinterpret_cast<__m512i*>(words + 4 * g);
        _mm512_storeu_si512(out + 0, _mm512_shuffle_i32x4(lo01, lo23, 0x88));
        _mm512_storeu_si512(out + 1, _mm512_shuffle_i32x4(lo01, lo23, 0xDD));
        _mm512_storeu_si512(out + 2, _mm512_shuffle_i32x4(hi01, hi23, 0x88));
        _mm512_storeu_si512(out + 3, _mm512_shuffle_i32x4(hi01, hi23, 0xDD));
      });
}

}  // namespace pege
#endif
