// The CPU kernels' Philox words on AVX-512 machines: 64 counters in four zmm
// registers (several chains in flight), one 32-bit word per lane, through
// pege_math.h's rounds on the Vecs type below. GCC's generic vector code would
// turn the 32x32->64 products into a full 64-bit multiply emulation.
// This file includes no ATen header, so nothing compiled here for AVX-512
// can be shared (via inline functions) with code that runs elsewhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f")
#include <immintrin.h>

#include <cstdint>

#include "../pege_math.h"
#include "philox_x86.h"

namespace pege {
namespace {

using V = __m512i;

inline __attribute__((always_inline)) V xor_v(V a, V b) {
  return _mm512_xor_si512(a, b);
}
inline __attribute__((always_inline)) V set1(uint32_t v) {
  return _mm512_set1_epi32(static_cast<int>(v));
}
// 32x32->64 products of the even 32-bit lanes (vpmuludq).
inline __attribute__((always_inline)) V mul_even(V a, V b) { return _mm512_mul_epu32(a, b); }
inline __attribute__((always_inline)) V srli64(V a, int n) { return _mm512_srli_epi64(a, n); }
inline __attribute__((always_inline)) V slli64(V a, int n) { return _mm512_slli_epi64(a, n); }
inline __attribute__((always_inline)) V blend_odd(V a, V b) { return _mm512_mask_blend_epi32(0xAAAA, a, b); }

// Four counter words of lane order -> element order inside each 128-bit
// lane: r[q] holds, in 128-bit lane L, the four words of group 4L + q.
inline __attribute__((always_inline)) void transpose_128(V c0, V c1, V c2, V c3, V r[4]) {
  const V a = _mm512_unpacklo_epi32(c0, c1), b = _mm512_unpackhi_epi32(c0, c1);
  const V c = _mm512_unpacklo_epi32(c2, c3), d = _mm512_unpackhi_epi32(c2, c3);
  r[0] = _mm512_unpacklo_epi64(a, c);
  r[1] = _mm512_unpackhi_epi64(a, c);
  r[2] = _mm512_unpacklo_epi64(b, d);
  r[3] = _mm512_unpackhi_epi64(b, d);
}

template <class V, int N>
struct Vecs {
  V v[N];
};

template <class V, int N>
inline __attribute__((always_inline)) Vecs<V, N> operator^(const Vecs<V, N>& a,
                                                           const Vecs<V, N>& b) {
  Vecs<V, N> r;
  for (int k = 0; k < N; ++k) r.v[k] = xor_v(a.v[k], b.v[k]);
  return r;
}

template <class V, int N>
inline __attribute__((always_inline)) Vecs<V, N> operator^(const Vecs<V, N>& a, uint32_t b) {
  Vecs<V, N> r;
  const V bv = set1(b);
  for (int k = 0; k < N; ++k) r.v[k] = xor_v(a.v[k], bv);
  return r;
}

template <class V, int N>
inline __attribute__((always_inline)) Vecs<V, N> operator^(uint32_t a, const Vecs<V, N>& b) {
  return b ^ a;
}

template <class V, int N>
inline __attribute__((always_inline)) void broadcast(Vecs<V, N>& dst, uint32_t v) {
  for (int k = 0; k < N; ++k) dst.v[k] = set1(v);
}

// hi, lo of m * a per 32-bit lane: one vpmuludq per even / odd half.
template <class V, int N>
inline __attribute__((always_inline)) void mulhilo32(uint32_t m, const Vecs<V, N>& a,
                                                     Vecs<V, N>& hi, Vecs<V, N>& lo) {
  const V mv = set1(m);  // m in every 32-bit lane: the even ones are read
  for (int k = 0; k < N; ++k) {
    const V even = mul_even(a.v[k], mv);
    const V odd = mul_even(srli64(a.v[k], 32), mv);
    lo.v[k] = blend_odd(even, slli64(odd, 32));
    hi.v[k] = blend_odd(srli64(even, 32), odd);
  }
}

// words[4 * g + k] = word k of group j0 + g for g < groups (a multiple of
// N * kLanes), all groups sharing j's high word. lane: 0, 1, .., kLanes - 1.
// regroup(r, out) stores the words of kLanes groups, given transpose_128's
// r, in element order at out.
template <int N, int kLanes, class Regroup>
inline __attribute__((always_inline)) void philox_simd(uint32_t* words, uint64_t j0,
                                                       int64_t groups, uint64_t seed,
                                                       uint64_t offset, V lane,
                                                       Regroup regroup) {
  for (int64_t g = 0; g < groups; g += N * kLanes) {
    // c1 (j's high word), c2 and c3 (the offset) are the same in all lanes.
    Vecs<V, N> c0, c1, c2, c3;
    for (int k = 0; k < N; ++k)
      c0.v[k] = _mm512_add_epi32(set1(static_cast<uint32_t>(j0 + g + kLanes * k)), lane);
    philox_rounds_uniform(c0, c1, c2, c3, static_cast<uint32_t>(j0 >> 32),
                          static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    for (int k = 0; k < N; ++k) {
      V r[4];
      transpose_128(c0.v[k], c1.v[k], c2.v[k], c3.v[k], r);
      regroup(r, words + 4 * (g + kLanes * k));
    }
  }
}

}  // namespace

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
