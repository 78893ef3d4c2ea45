// The CPU kernels' Philox words on AVX2 machines without AVX-512.
//
// Layout: each counter word sits in the low half of a 64-bit lane, four
// counters per ymm register. vpmuludq reads only the low halves and returns
// the whole 32x32 product, lo in the low half and hi in the high one, so a
// round costs per word one multiply, one shift (hi down) and two xors, and
// the junk left in the high halves is never read. Three sets of four
// counters are in flight: a round's chain (multiply, shift, xor) is about
// five cycles long, three sets give the one multiplier six products in it.
//
// Rounds 2-9 are one asm statement over registers named below. Written as
// intrinsics, the same rounds came out of GCC with state spilled to the
// stack between rounds (in a microbenchmark on Zen 2: 9.6 cycles per
// counter, against 8.8 with the asm and 12.7 with one word per 32-bit lane).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2")
#include <immintrin.h>

#include "../pege_math.h"
#include "philox_x86.h"

namespace pege {
namespace {

// One round of one set, key at byte k of keys: (c0, c1, c2, c3) becomes
// (c0, f1, c2, f3). The products go to the free pair (f1, f3), and the old
// (c1, c3), once xored in, is the next set-round's free pair.
#define PEGE_SET_ROUND(c0, c2, c1, c3, f1, f3, k)        \
  "vpmuludq %[m0], %[" #c0 "], %[" #f3 "]\n\t"           \
  "vpmuludq %[m1], %[" #c2 "], %[" #f1 "]\n\t"           \
  "vpxor " #k "(%[keys]), %[" #c1 "], %[" #c1 "]\n\t"    \
  "vpxor " #k "+32(%[keys]), %[" #c3 "], %[" #c3 "]\n\t" \
  "vpsrlq $32, %[" #f1 "], %[" #c0 "]\n\t"               \
  "vpxor %[" #c1 "], %[" #c0 "], %[" #c0 "]\n\t"         \
  "vpsrlq $32, %[" #f3 "], %[" #c2 "]\n\t"               \
  "vpxor %[" #c3 "], %[" #c2 "], %[" #c2 "]\n\t"

// Four rounds of the sets x, y, z, whose (c1, c3) start in the pairs a, b,
// c, with d free. After four rounds each pair is back with its set.
#define PEGE_FOUR_ROUNDS(k0, k1, k2, k3)                                                 \
  PEGE_SET_ROUND(x0, x2, a1, a3, d1, d3, k0) PEGE_SET_ROUND(y0, y2, b1, b3, a1, a3, k0) \
  PEGE_SET_ROUND(z0, z2, c1, c3, b1, b3, k0) PEGE_SET_ROUND(x0, x2, d1, d3, c1, c3, k1) \
  PEGE_SET_ROUND(y0, y2, a1, a3, d1, d3, k1) PEGE_SET_ROUND(z0, z2, b1, b3, a1, a3, k1) \
  PEGE_SET_ROUND(x0, x2, c1, c3, b1, b3, k2) PEGE_SET_ROUND(y0, y2, d1, d3, c1, c3, k2) \
  PEGE_SET_ROUND(z0, z2, a1, a3, d1, d3, k2) PEGE_SET_ROUND(x0, x2, b1, b3, a1, a3, k3) \
  PEGE_SET_ROUND(y0, y2, c1, c3, b1, b3, k3) PEGE_SET_ROUND(z0, z2, d1, d3, c1, c3, k3)

// The same for the set x alone (pair a, free d): back in place after two.
#define PEGE_TWO_ROUNDS(k0, k1) \
  PEGE_SET_ROUND(x0, x2, a1, a3, d1, d3, k0) PEGE_SET_ROUND(x0, x2, d1, d3, a1, a3, k1)

// Byte offsets in keys of the round keys of rounds 2..9.
#define PEGE_KEYS_2_TO_9(R) R(0, 64, 128, 192) R(256, 320, 384, 448)
#define PEGE_KEYS_2_TO_9_PAIRS(R) R(0, 64) R(128, 192) R(256, 320) R(384, 448)

// Four counter words in the low halves of a ymm register's 64-bit lanes,
// with the operations pege_math.h's philox_round needs: rounds 0 and 1 run
// through it (its uniform-lane form, as philox_rounds_uniform), rounds 2-9
// through the asm below.
struct Wide {
  __m256i v;
};

inline __attribute__((always_inline)) void mulhilo32(uint32_t m, Wide a, Wide& hi, Wide& lo) {
  lo.v = _mm256_mul_epu32(a.v, _mm256_set1_epi32(static_cast<int>(m)));
  hi.v = _mm256_srli_epi64(lo.v, 32);
}
inline __attribute__((always_inline)) Wide operator^(Wide a, Wide b) {
  return Wide{_mm256_xor_si256(a.v, b.v)};
}
inline __attribute__((always_inline)) Wide operator^(Wide a, uint32_t b) {
  return Wide{_mm256_xor_si256(a.v, _mm256_set1_epi32(static_cast<int>(b)))};
}
inline __attribute__((always_inline)) Wide operator^(uint32_t a, Wide b) { return b ^ a; }

struct Set {
  __m256i c0, c1, c2, c3;
};

// The state after rounds 0 and 1 of the counters (c0, u1, u2, u3), c0 in
// lanes, u1..u3 the same in all: round 0 multiplies the uniform c2 once for
// all lanes, round 1 the then uniform c0.
inline __attribute__((always_inline)) Set first_rounds(__m256i c0, uint32_t u1, uint32_t u2,
                                                       uint32_t u3, uint32_t k0, uint32_t k1) {
  const auto r0 = philox_round(Wide{c0}, u1, u2, u3, k0, k1);  // c0, c1 uniform now
  const auto r1 = philox_round(r0.c0, r0.c1, r0.c2, r0.c3, k0 + kPhiloxW0, k1 + kPhiloxW1);
  return Set{r1.c0.v, r1.c1.v, r1.c2.v, _mm256_set1_epi32(static_cast<int>(r1.c3))};
}

// The words of a set whose lanes hold the counters j, j + 2, j + 1, j + 3,
// in element order: groups j and j + 1 in the first 32 bytes, j + 2 and
// j + 3 in the next (no lane-crossing shuffle).
inline __attribute__((always_inline)) void store(const Set& s, uint32_t* at) {
  const __m256i w01 = _mm256_blend_epi32(s.c0, _mm256_shuffle_epi32(s.c1, 0xA0), 0xAA);
  const __m256i w23 = _mm256_blend_epi32(s.c2, _mm256_shuffle_epi32(s.c3, 0xA0), 0xAA);
  __m256i* out = reinterpret_cast<__m256i*>(at);
  _mm256_storeu_si256(out, _mm256_unpacklo_epi64(w01, w23));
  _mm256_storeu_si256(out + 1, _mm256_unpackhi_epi64(w01, w23));
}

}  // namespace

void philox_words_avx2(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                       uint64_t offset) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  alignas(32) __m256i keys[16];  // rounds 2..9: (k0, k1) + r * (W0, W1)
  for (int r = 2; r < 10; ++r) {
    keys[2 * r - 4] = _mm256_set1_epi32(static_cast<int>(k0 + r * kPhiloxW0));
    keys[2 * r - 3] = _mm256_set1_epi32(static_cast<int>(k1 + r * kPhiloxW1));
  }
  const uint32_t u1 = static_cast<uint32_t>(j0 >> 32), u2 = static_cast<uint32_t>(offset),
                 u3 = static_cast<uint32_t>(offset >> 32);
  const auto first = [&](__m256i c0) { return first_rounds(c0, u1, u2, u3, k0, k1); };
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i lanes = _mm256_setr_epi32(0, 0, 2, 0, 1, 0, 3, 0);  // see store()
  int64_t g = 0;
  for (; g + 12 <= groups; g += 12) {
    const __m256i j = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j0 + g)), lanes);
    Set x = first(j), y = first(_mm256_add_epi32(j, _mm256_set1_epi32(4))),
        z = first(_mm256_add_epi32(j, _mm256_set1_epi32(8)));
    __m256i d1, d3;
    asm(PEGE_KEYS_2_TO_9(PEGE_FOUR_ROUNDS)
        : [x0] "+x"(x.c0), [x2] "+x"(x.c2), [a1] "+x"(x.c1), [a3] "+x"(x.c3),
          [y0] "+x"(y.c0), [y2] "+x"(y.c2), [b1] "+x"(y.c1), [b3] "+x"(y.c3),
          [z0] "+x"(z.c0), [z2] "+x"(z.c2), [c1] "+x"(z.c1), [c3] "+x"(z.c3),
          [d1] "=&x"(d1), [d3] "=&x"(d3)
        : [m0] "x"(m0), [m1] "x"(m1), [keys] "r"(keys), "m"(keys));
    store(x, words + 4 * g);
    store(y, words + 4 * (g + 4));
    store(z, words + 4 * (g + 8));
  }
  for (; g < groups; g += 4) {  // the last one or two sets, one at a time
    Set x = first(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j0 + g)), lanes));
    __m256i d1, d3;
    asm(PEGE_KEYS_2_TO_9_PAIRS(PEGE_TWO_ROUNDS)
        : [x0] "+x"(x.c0), [x2] "+x"(x.c2), [a1] "+x"(x.c1), [a3] "+x"(x.c3),
          [d1] "=&x"(d1), [d3] "=&x"(d3)
        : [m0] "x"(m0), [m1] "x"(m1), [keys] "r"(keys), "m"(keys));
    store(x, words + 4 * g);
  }
}

}  // namespace pege
#endif
