// Philox lanes in SIMD registers, shared by philox_avx512.cpp and
// philox_avx2.cpp. Each includes this after its `#pragma GCC target`, with
// its register type and intrinsics named by four macros:
//   PEGE_V (the register type), PEGE_OP(name) (the intrinsic _mmNNN_name),
//   PEGE_XOR (its bitwise xor) and PEGE_BLEND_ODD(a, b) (a's even 32-bit
//   lanes, b's odd ones).
// A Vecs<V, N> is N registers of counters; pege_math.h's philox_rounds_uniform
// runs on it through the operators below. Internal linkage: each file's
// instantiations are compiled for its own target only.
#pragma once

#include <cstdint>

#include "../pege_math.h"

namespace pege {
namespace {

using V = PEGE_V;

inline __attribute__((always_inline)) V xor_v(V a, V b) {
  return PEGE_XOR(a, b);
}
inline __attribute__((always_inline)) V set1(uint32_t v) {
  return PEGE_OP(set1_epi32)(static_cast<int>(v));
}
// 32x32->64 products of the even 32-bit lanes (vpmuludq).
inline __attribute__((always_inline)) V mul_even(V a, V b) { return PEGE_OP(mul_epu32)(a, b); }
inline __attribute__((always_inline)) V srli64(V a, int n) { return PEGE_OP(srli_epi64)(a, n); }
inline __attribute__((always_inline)) V slli64(V a, int n) { return PEGE_OP(slli_epi64)(a, n); }
inline __attribute__((always_inline)) V blend_odd(V a, V b) { return PEGE_BLEND_ODD(a, b); }

// Four counter words of lane order -> element order inside each 128-bit
// lane: r[q] holds, in 128-bit lane L, the four words of group 4L + q.
inline __attribute__((always_inline)) void transpose_128(V c0, V c1, V c2, V c3, V r[4]) {
  const V a = PEGE_OP(unpacklo_epi32)(c0, c1), b = PEGE_OP(unpackhi_epi32)(c0, c1);
  const V c = PEGE_OP(unpacklo_epi32)(c2, c3), d = PEGE_OP(unpackhi_epi32)(c2, c3);
  r[0] = PEGE_OP(unpacklo_epi64)(a, c);
  r[1] = PEGE_OP(unpackhi_epi64)(a, c);
  r[2] = PEGE_OP(unpacklo_epi64)(b, d);
  r[3] = PEGE_OP(unpackhi_epi64)(b, d);
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
      c0.v[k] = PEGE_OP(add_epi32)(set1(static_cast<uint32_t>(j0 + g + kLanes * k)), lane);
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
}  // namespace pege
