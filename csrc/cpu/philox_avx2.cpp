// The CPU kernels' Philox words on AVX2 machines without AVX-512: 16
// counters in two ymm registers per word (eight registers of counters leave
// room for the products in sixteen; more lanes spill to the stack).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2")
#include <immintrin.h>

#include "philox_x86.h"

#define PEGE_V __m256i
#define PEGE_OP(name) _mm256_##name
#define PEGE_XOR _mm256_xor_si256
#define PEGE_BLEND_ODD(a, b) _mm256_blend_epi32(a, b, 0xAA)
#include "philox_simd.h"

namespace pege {

void philox_words_avx2(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                       uint64_t offset) {
  // r[q] holds groups q and 4 + q in its halves; out[m] gets 2m and 2m + 1.
  philox_simd<2, 8>(words, j0, groups, seed, offset, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                    [](const __m256i* r, uint32_t* at) {
                      __m256i* out = reinterpret_cast<__m256i*>(at);
                      _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(r[0], r[1], 0x20));
                      _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(r[2], r[3], 0x20));
                      _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(r[0], r[1], 0x31));
                      _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(r[2], r[3], 0x31));
                    });
}

}  // namespace pege
#endif
