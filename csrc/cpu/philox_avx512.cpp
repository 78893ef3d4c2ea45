// The CPU kernels' Philox words on AVX-512 machines: 64 counters in four zmm
// registers (several chains in flight). GCC's generic vector code would turn
// the 32x32->64 products into a full 64-bit multiply emulation.
// This file includes no ATen header, so nothing compiled here for AVX-512
// can be shared (via inline functions) with code that runs elsewhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f")
#include <immintrin.h>

#include "philox_x86.h"

#define PEGE_V __m512i
#define PEGE_OP(name) _mm512_##name
#define PEGE_XOR _mm512_xor_si512
#define PEGE_BLEND_ODD(a, b) _mm512_mask_blend_epi32(0xAAAA, a, b)
#include "philox_simd.h"

namespace pege {

void philox_words_avx512(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                         uint64_t offset) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // r[q] holds group 4L + q in its 128-bit lane L; a 4x4 transpose of the
  // 128-bit lanes puts groups 4m .. 4m + 3 in out[m].
  philox_simd<4, 16>(words, j0, groups, seed, offset, lane, [](const __m512i* r, uint32_t* at) {
    const __m512i lo01 = _mm512_shuffle_i32x4(r[0], r[1], 0x44);  // r0.0 r0.1 r1.0 r1.1
    const __m512i lo23 = _mm512_shuffle_i32x4(r[2], r[3], 0x44);  // r2.0 r2.1 r3.0 r3.1
    const __m512i hi01 = _mm512_shuffle_i32x4(r[0], r[1], 0xEE);  // r0.2 r0.3 r1.2 r1.3
    const __m512i hi23 = _mm512_shuffle_i32x4(r[2], r[3], 0xEE);  // r2.2 r2.3 r3.2 r3.3
    __m512i* out = reinterpret_cast<__m512i*>(at);
    _mm512_storeu_si512(out + 0, _mm512_shuffle_i32x4(lo01, lo23, 0x88));
    _mm512_storeu_si512(out + 1, _mm512_shuffle_i32x4(lo01, lo23, 0xDD));
    _mm512_storeu_si512(out + 2, _mm512_shuffle_i32x4(hi01, hi23, 0x88));
    _mm512_storeu_si512(out + 3, _mm512_shuffle_i32x4(hi01, hi23, 0xDD));
  });
}

}  // namespace pege
#endif
