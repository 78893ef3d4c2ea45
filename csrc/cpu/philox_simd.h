// Philox lanes in SIMD registers, shared by philox_avx512.cpp and
// philox_avx2.cpp. Each includes this after its `#pragma GCC target` and
// after defining, for its register type V, the primitives
//   V xor_v(V, V); V set1(uint32_t); V mul_even(V, V) (32x32->64 products of
//   the even 32-bit lanes: vpmuludq); V srli64(V, int); V slli64(V, int);
//   V blend_odd(V a, V b) (a's even 32-bit lanes, b's odd ones).
// A Vecs<V, N> is N registers of counters; pege_math.h's philox_rounds_uniform
// runs on it through the operators below. Internal linkage: each file's
// instantiations are compiled for its own target only.
#pragma once

#include <cstdint>

#include "../pege_math.h"

namespace pege {
namespace {

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

// The counters of groups j0 + g .. j0 + g + N * lanes - 1 (lanes 32-bit lanes
// per register, lane order), after the ten rounds; store(c, g) writes them.
template <class V, int N, int kLanes, class Iota, class Store>
inline __attribute__((always_inline)) void philox_simd(uint64_t j0, int64_t groups,
                                                       uint64_t seed, uint64_t offset,
                                                       Iota iota, Store store) {
  for (int64_t g = 0; g < groups; g += N * kLanes) {
    // c1 (j's high word), c2 and c3 (the offset) are the same in all lanes.
    Vecs<V, N> c0, c1, c2, c3;
    for (int k = 0; k < N; ++k) c0.v[k] = iota(static_cast<uint32_t>(j0 + g + kLanes * k));
    philox_rounds_uniform(c0, c1, c2, c3, static_cast<uint32_t>(j0 >> 32),
                          static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    for (int k = 0; k < N; ++k) store(c0.v[k], c1.v[k], c2.v[k], c3.v[k], g + kLanes * k);
  }
}

}  // namespace
}  // namespace pege
