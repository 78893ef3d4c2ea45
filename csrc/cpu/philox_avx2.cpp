// The CPU kernels' Philox words on AVX2 machines without AVX-512: 16
// counters in two ymm registers per word (eight registers of counters leave
// room for the products in sixteen; more lanes spill to the stack).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2")
#include <immintrin.h>

#include "philox_x86.h"

namespace pege {
namespace {

inline __attribute__((always_inline)) __m256i xor_v(__m256i a, __m256i b) {
  return _mm256_xor_si256(a, b);
}
inline __attribute__((always_inline)) __m256i set1(uint32_t v) {
  return _mm256_set1_epi32(static_cast<int>(v));
}
inline __attribute__((always_inline)) __m256i mul_even(__m256i a, __m256i b) {
  return _mm256_mul_epu32(a, b);
}
inline __attribute__((always_inline)) __m256i srli64(__m256i a, int n) {
  return _mm256_srli_epi64(a, n);
}
inline __attribute__((always_inline)) __m256i slli64(__m256i a, int n) {
  return _mm256_slli_epi64(a, n);
}
inline __attribute__((always_inline)) __m256i blend_odd(__m256i a, __m256i b) {
  return _mm256_blend_epi32(a, b, 0xAA);
}

}  // namespace
}  // namespace pege

#include "philox_simd.h"

namespace pege {

void philox_words_avx2(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                       uint64_t offset) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  philox_simd<__m256i, 2, 8>(
      j0, groups, seed, offset,
      [&](uint32_t first) { return _mm256_add_epi32(set1(first), lane); },
      [&](__m256i c0, __m256i c1, __m256i c2, __m256i c3, int64_t g) {
        // 4x4 transposes inside each 128-bit half (r_q: groups q and 4 + q),
        // then the halves regrouped: out[m] holds groups 2m, 2m + 1.
        const __m256i a = _mm256_unpacklo_epi32(c0, c1), b = _mm256_unpackhi_epi32(c0, c1);
        const __m256i c = _mm256_unpacklo_epi32(c2, c3), d = _mm256_unpackhi_epi32(c2, c3);
        const __m256i r0 = _mm256_unpacklo_epi64(a, c), r1 = _mm256_unpackhi_epi64(a, c);
        const __m256i r2 = _mm256_unpacklo_epi64(b, d), r3 = _mm256_unpackhi_epi64(b, d);
        __m256i* out = reinterpret_cast<__m256i*>(words + 4 * g);
        _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(r0, r1, 0x20));
        _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(r2, r3, 0x20));
        _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(r0, r1, 0x31));
        _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(r2, r3, 0x31));
      });
}

}  // namespace pege
#endif
