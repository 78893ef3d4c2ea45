// The PEGE contract (docs/method.md) as inline functions shared by the CPU
// and CUDA kernels. Every formula of the op lives here and nowhere else in
// C++: kernels only load, call these, and store.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PEGE_HD __host__ __device__ __forceinline__
#else
#define PEGE_HD inline __attribute__((always_inline))
#endif

namespace pege {

// ---------------------------------------------------------------- Philox
// Philox4x32-10 (Salmon et al. 2011), the constants of Random123 and Triton.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t v[4];
};

PEGE_HD void mulhilo32(uint32_t m, uint32_t a, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(m, a);
  lo = m * a;
#else
  const uint64_t p = static_cast<uint64_t>(m) * a;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

#if !defined(__CUDACC__)
// W independent Philox counters at once for the CPU kernels. Written as
// loops over lanes so GCC's vectorizer sees a widening 32x32->64 multiply
// ((v)pmuludq); W = 64 keeps four vector chains in flight, since one chain
// of ten rounds is latency-bound.
template <int W>
struct Lanes {
  uint32_t v[W];
};

template <int W>
PEGE_HD void mulhilo32(uint32_t m, const Lanes<W>& a, Lanes<W>& hi, Lanes<W>& lo) {
  for (int l = 0; l < W; ++l) {
    const uint64_t p = static_cast<uint64_t>(m) * a.v[l];
    hi.v[l] = static_cast<uint32_t>(p >> 32);
    lo.v[l] = static_cast<uint32_t>(p);
  }
}

template <int W>
PEGE_HD Lanes<W> operator^(const Lanes<W>& a, const Lanes<W>& b) {
  Lanes<W> r;
  for (int l = 0; l < W; ++l) r.v[l] = a.v[l] ^ b.v[l];
  return r;
}

template <int W>
PEGE_HD Lanes<W> operator^(const Lanes<W>& a, uint32_t b) {
  Lanes<W> r;
  for (int l = 0; l < W; ++l) r.v[l] = a.v[l] ^ b;
  return r;
}

template <int W>
PEGE_HD Lanes<W> operator^(uint32_t a, const Lanes<W>& b) {
  return b ^ a;
}

template <int W>
PEGE_HD void broadcast(Lanes<W>& dst, uint32_t v) {
  for (int l = 0; l < W; ++l) dst.v[l] = v;
}
#endif

// A counter whose four words may have different types: uint32_t, or a vector
// of lanes (each lane an independent counter).
template <typename A, typename B, typename C, typename D>
struct Counter {
  A c0;
  B c1;
  C c2;
  D c3;
};

// One round with round key (k0, k1). A word's type follows what it depends
// on: a product of a uint32_t word stays a uint32_t.
template <typename A, typename B, typename C, typename D>
PEGE_HD auto philox_round(const A& c0, const B& c1, const C& c2, const D& c3, uint32_t k0,
                          uint32_t k1) {
  A hi0, lo0;
  C hi1, lo1;
  mulhilo32(kPhiloxM0, c0, hi0, lo0);
  mulhilo32(kPhiloxM1, c2, hi1, lo1);
  auto n0 = hi1 ^ (c1 ^ k0);  // c1 ^ k0: off the product's chain, and one op when uniform
  auto n2 = hi0 ^ (c3 ^ k1);
  return Counter<decltype(n0), C, decltype(n2), A>{n0, lo1, n2, lo0};
}

// Rounds first .. 9 on a counter (c0..c3) with key (k0, k1); round r's key
// is (k0 + r * W0, k1 + r * W1) mod 2^32. U is uint32_t or a lane type.
template <typename U>
PEGE_HD void philox_rounds(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1,
                           int first = 0) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = first; r < 10; ++r) {
    const auto n = philox_round(c0, c1, c2, c3, k0 + r * kPhiloxW0, k1 + r * kPhiloxW1);
    c0 = n.c0;
    c1 = n.c1;
    c2 = n.c2;
    c3 = n.c3;
  }
}

#if !defined(__CUDACC__)
// The ten rounds for lanes that differ only in c0, with c1..c3 = u1..u3 in
// every lane (the CPU kernels' counters (j, offset) within a tile, where j's
// high word does not change). Round 0 multiplies c2 and round 1 c0 while they are still
// uniform, once instead of per lane: 18 lane products of 20.
template <typename U>
PEGE_HD void philox_rounds_uniform(U& c0, U& c1, U& c2, U& c3, uint32_t u1, uint32_t u2,
                                   uint32_t u3, uint32_t k0, uint32_t k1) {
  const auto r0 = philox_round(c0, u1, u2, u3, k0, k1);  // uint32_t, uint32_t, U, U
  const auto r1 = philox_round(r0.c0, r0.c1, r0.c2, r0.c3, k0 + kPhiloxW0,
                               k1 + kPhiloxW1);          // U, U, U, uint32_t
  c0 = r1.c0;
  c1 = r1.c1;
  c2 = r1.c2;
  broadcast(c3, r1.c3);
  philox_rounds(c0, c1, c2, c3, k0, k1, 2);
}
#endif

PEGE_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                            uint32_t k0, uint32_t k1) {
  philox_rounds(c0, c1, c2, c3, k0, k1);
  return U32x4{{c0, c1, c2, c3}};
}

// The four Philox words of element group j = i >> 2 (elements 4j .. 4j+3):
// key = seed, counter = (j, offset), both split into 32-bit halves.
PEGE_HD U32x4 mask_words(uint64_t j, uint64_t seed, uint64_t offset) {
  return philox4x32_10(static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32),
                       static_cast<uint32_t>(offset),
                       static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// The element formulas below take F = float, or on the CPU a GCC vector of
// floats (one element per lane): comparisons then give lane masks, and
// `m ? a : b` selects per lane for both.
PEGE_HD int32_t to_signed(uint32_t v) { return static_cast<int32_t>(v); }
#if !defined(__CUDACC__)
// A GCC vector of uint32_t as one of int32_t, lanes reinterpreted.
template <typename U>
PEGE_HD auto to_signed(U v) {
  typedef int32_t Signed __attribute__((vector_size(sizeof(U))));
  return reinterpret_cast<Signed>(v);
}
#endif

// m_i = (u_i < T), u_i the top 24 bits of the element's word; T = round(r*2^24)
// in [0, 2^24] (the op checks it). Both sides are then below 2^31, so the
// comparison may be a signed one (a single instruction for x86 vectors).
// U: uint32_t or a vector of them.
template <typename U>
PEGE_HD auto replaced(U word, uint32_t threshold) {
  return to_signed(word >> 8) < static_cast<int32_t>(threshold);
}

// ---------------------------------------------------------------- quantizer
// Per-channel constants, computed once per channel.
struct Channel {
  float s;     // scale
  float inv;   // 1.0f / s, in fp32 as torch's fake quant does
  float zi;    // clamp(nearbyint(z), qmin, qmax), or z as is
};

PEGE_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return __builtin_nearbyintf(v);
#endif
}

#if !defined(__CUDACC__)
// The same for a GCC vector of floats, lane by lane (vroundps where the
// target has it).
template <typename V>
PEGE_HD V round_half_even(V v) {
  for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(float)); ++l)
    v[l] = __builtin_nearbyintf(v[l]);
  return v;
}
#endif

// v as an F (every lane v). For vectors 0 + v, the form GCC broadcasts once
// outside a loop; it turns -0.0f into +0.0f. Callers pass qmin, qmax, +-1
// and -s: -0.0f only where s is 0 (a dynamic scale, never a learned one), and
// then only into zero-point terms, which start from +0 when summed.
template <typename F>
PEGE_HD F splat(float v) {
  if constexpr (sizeof(F) == sizeof(float)) {
    return v;
  } else {
    return F{} + v;
  }
}

// A learned zero point is rounded and clamped; a dynamic one (as_is: an
// integer from the data, possibly outside [qmin, qmax]) is used as it is.
PEGE_HD Channel make_channel(float s, float z, float qmin, float qmax, bool as_is = false) {
  float zi = z;
  if (!as_is) {
    zi = round_half_even(z);
    zi = zi < qmin ? qmin : (zi > qmax ? qmax : zi);
  }
  return Channel{s, 1.0f / s, zi};
}

// ------------------------------------------------------- dynamic qparams
// A group's (s, z) derived from its values (fake_quant_dynamic; docs/method.md
// "Per-group and per-token"), with torchao 0.18's arithmetic: every step in
// x's dtype, i.e. computed in fp32 and rounded to it (Round), in torch's order.
enum Mapping : int {
  kAsymmetric = 0,       // choose_qparams_affine: range includes 0, integer z
  kSymmetric = 1,        // max(-lo, hi) / (width / 2), z fixed
  kAsymmetricGroup = 2,  // groupwise: lo .. hi, z = lo + s * (width + 1) / 2
};

struct Dynamic {
  int mapping;
  float divisor;        // width = qmax - qmin, or width / 2 (symmetric)
  float inv_divisor;    // 1.0f / divisor
  bool by_reciprocal;   // torch on CUDA divides by a Python number as a * (1 / d)
  float eps;            // minimum scale, in x's dtype
  float mid;            // (width + 1) / 2
  float z_symmetric;    // int((qmax + qmin + 1) / 2)
};

// float -> int32 -> float as x86 converts (cvttss2si): truncation; NaN, inf
// and values outside int32 give -2^31 (torchao's zero_point.to(int32)).
PEGE_HD float trunc_int32(float z) {
  const bool ok = z >= -2147483648.0f && z < 2147483648.0f;  // false for NaN
#if defined(__CUDA_ARCH__)
  return ok ? truncf(z) : -2147483648.0f;
#else
  return ok ? __builtin_truncf(z) : -2147483648.0f;
#endif
}

// Clamp that keeps a NaN, as torch.clamp does.
PEGE_HD float clamp_nan(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// (s, z) of a group whose min and max are lo and hi (NaN when the group
// holds a NaN: torch's amin / amax propagate it). `in_dtype` maps an fp32 value
// to x's dtype and back.
template <typename Round>
PEGE_HD void dynamic_qparams(float lo, float hi, const Dynamic& d, float qmin, float qmax,
                             Round in_dtype, float& s_out, float& z_out) {
  if (d.mapping != kAsymmetricGroup) {  // torch.min(lo, 0), torch.max(hi, 0)
    lo = lo > 0.0f ? 0.0f : lo;
    hi = hi < 0.0f ? 0.0f : hi;
  }
  float range;
  if (d.mapping == kSymmetric) {
    const float nlo = -lo;
    range = nlo != nlo ? nlo : (nlo > hi ? nlo : hi);  // torch.max(-lo, hi)
  } else {
    range = in_dtype(hi - lo);
  }
  float s = in_dtype(d.by_reciprocal ? range * d.inv_divisor : range / d.divisor);
  s = s < d.eps ? d.eps : s;  // torch.clamp(min=eps); NaN stays
  float z;
  if (d.mapping == kSymmetric) {
    z = d.z_symmetric;
  } else if (d.mapping == kAsymmetric) {
    const float r = in_dtype(round_half_even(in_dtype(lo / s)));
    z = clamp_nan(in_dtype(qmin - r), qmin, qmax);
  } else {
    z = in_dtype(lo + in_dtype(s * d.mid));
  }
  s_out = s;
  z_out = trunc_int32(z);
}

// Everything the forward and backward need of one element (of each lane).
template <typename F>
struct QuantOf {
  using Mask = decltype(F{} < F{});
  F q;         // (c - zi) * s
  F c;         // clamp(t, qmin, qmax)
  Mask below;  // t < qmin
  Mask above;  // t > qmax
};
using Quant = QuantOf<float>;

// t = nearbyint(x * inv) + zi, qmin < qmax. The clamp is written with
// comparisons, not fminf/fmaxf, so a NaN x stays NaN in q; NaN counts as
// "in range" (neither below nor above), which makes it propagate into dx and
// the scale gradient. `lo > t ? lo : t` keeps t when t is NaN: x86's maxps
// (and `hi < m ? hi : m` its minps), one instruction each for vectors.
template <typename F>
PEGE_HD QuantOf<F> quantize(F x, Channel ch, float qmin, float qmax) {
  const F t = round_half_even(x * ch.inv) + ch.zi;
  const F lo = splat<F>(qmin), hi = splat<F>(qmax);
  const F m = lo > t ? lo : t;
  const F c = hi < m ? hi : m;
  return QuantOf<F>{(c - ch.zi) * ch.s, c, t < qmin, t > qmax};
}

template <typename F>
PEGE_HD F sign_of(F g) {
  return g > 0.0f ? splat<F>(1.0f) : (g < 0.0f ? splat<F>(-1.0f) : F{});
}

// The per-element backward of a replaced element (m_i = 1):
//   gx  = g * in_range * (1 + delta * sign(g) * (x - q) * inv) + lam * (x - q)
//   gq  = g + lam * (q - x)        (upstream of dq/ds and dq/dz)
//   gs += gq * dq/ds,  gz += gq * dq/dz  (grad_factor is applied once, after
//                                          the reduction)
// lam == 0 skips the lam terms entirely, so an infinite x (out of range,
// x - q = inf) still gives finite gradients, as torch's learnable op does.
template <typename F>
struct GradOf {
  F gx;
  F gs;  // gq * dq/ds
  F gz;  // gq * dq/dz
};
using Grad = GradOf<float>;

// kLam is lam != 0 and kDelta is delta != 0, template arguments so that CPU
// loops are compiled once per case (a select on a run-time flag inside the
// vectorized backward costs a third of its time). Every case returns the
// bits of the general formula above, rewritten with exact identities:
// q - x == -(x - q), so gq = g - lam * e and dq/ds = -(e * inv) in range;
// with delta == 0, 1 + delta * sign(g) * e * inv is 1, or NaN where e * inv
// is not finite, which 1 + 0 * (e * inv) reproduces without sign(g).
// Masks (bools, or a vector's lane masks) are combined with |, never ||,
// which GCC would keep as control flow.
template <bool kLam, bool kDelta, typename F>
PEGE_HD GradOf<F> replaced_grad(F g, F x, QuantOf<F> qu, Channel ch, float lam, float delta) {
  const F e = x - qu.q;
  const F ein = e * ch.inv;
  const auto out = qu.below | qu.above;  // out of range (NaN counts as in range)
  // Selects only, no branches.
  const F slope = kDelta ? 1.0f + delta * sign_of(g) * e * ch.inv : 1.0f + 0.0f * ein;
  const F gx_in = out ? F{} : g * slope;
  const F le = lam * e;
  const F gx = kLam ? gx_in + le : gx_in;
  const F gq = kLam ? g - le : g;
  // Out of range, c - zi is qmin - zi or qmax - zi.
  const F dqds = out ? qu.c - ch.zi : -ein;
  const F dqdz = out ? splat<F>(-ch.s) : F{};
  return GradOf<F>{gx, gq * dqds, gq * dqdz};
}

// The same with lam and delta tested at run time (float only).
PEGE_HD Grad replaced_grad(float g, float x, Quant qu, Channel ch, float lam, float delta) {
  if (lam != 0.0f)
    return delta != 0.0f ? replaced_grad<true, true, float>(g, x, qu, ch, lam, delta)
                         : replaced_grad<true, false, float>(g, x, qu, ch, lam, delta);
  return delta != 0.0f ? replaced_grad<false, true, float>(g, x, qu, ch, lam, delta)
                       : replaced_grad<false, false, float>(g, x, qu, ch, lam, delta);
}

}  // namespace pege
