// CTest of pege_math.h: Philox known answers, rounding and clamping edges,
// and the gradient terms' special cases. Plain asserts, no framework.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "../pege_math.h"

static int failures = 0;
#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);   \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

using namespace pege;

static void philox_known_answers() {
  const uint32_t kat[3][10] = {
      {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
      {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff,
       0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
      {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0,
       0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}};
  for (const auto& k : kat) {
    const U32x4 w = philox4x32_10(k[0], k[1], k[2], k[3], k[4], k[5]);
    for (int i = 0; i < 4; ++i) EXPECT(w.v[i] == k[6 + i]);
    // The CPU's lane form gives the same words in every lane.
    Lanes<8> c0, c1, c2, c3;
    for (int l = 0; l < 8; ++l) {
      c0.v[l] = k[0];
      c1.v[l] = k[1];
      c2.v[l] = k[2];
      c3.v[l] = k[3];
    }
    philox_rounds(c0, c1, c2, c3, k[4], k[5]);
    for (int l = 0; l < 8; ++l)
      EXPECT(c0.v[l] == k[6] && c1.v[l] == k[7] && c2.v[l] == k[8] && c3.v[l] == k[9]);
  }
  // mask_words puts (j, offset) in the counter and the seed in the key.
  const U32x4 a = mask_words(0x100000002ull, 0x300000004ull, 0x500000006ull);
  const U32x4 b = philox4x32_10(2, 1, 6, 5, 4, 3);
  for (int i = 0; i < 4; ++i) EXPECT(a.v[i] == b.v[i]);
  EXPECT(replaced(0x000000FFu, 1) && !replaced(0x00000100u, 1));
  EXPECT(replaced(0xFFFFFFFFu, 1u << 24) && !replaced(0u, 0));
}

static void philox_uniform_lanes() {
  // philox_rounds_uniform (c1..c3 shared by the lanes) gives the same words
  // as the general rounds, for keys and counters with high bits set.
  const uint64_t seeds[2] = {0x0123456789abcdefull, 0xffffffffffffffffull};
  const uint64_t j0s[2] = {0x00000007fffffff0ull, 0x0000000000000000ull};
  for (uint64_t seed : seeds)
    for (uint64_t j0 : j0s) {
      const uint64_t offset = seed ^ 0x5555aaaa5555aaaaull;
      Lanes<8> c0, c1, c2, c3;
      for (int l = 0; l < 8; ++l) c0.v[l] = static_cast<uint32_t>(j0 + l);
      philox_rounds_uniform(c0, c1, c2, c3, static_cast<uint32_t>(j0 >> 32),
                            static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                            static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      for (int l = 0; l < 8; ++l) {
        const U32x4 w = mask_words(j0 + l, seed, offset);
        EXPECT(c0.v[l] == w.v[0] && c1.v[l] == w.v[1] && c2.v[l] == w.v[2] &&
               c3.v[l] == w.v[3]);
      }
    }
}

static void rounding_and_clamping() {
  const Channel ch = make_channel(1.0f, 0.0f, -8.0f, 7.0f);
  // half to even
  EXPECT(quantize(0.5f, ch, -8, 7).q == 0.0f);
  EXPECT(quantize(1.5f, ch, -8, 7).q == 2.0f);
  EXPECT(quantize(2.5f, ch, -8, 7).q == 2.0f);
  EXPECT(quantize(-0.5f, ch, -8, 7).q == 0.0f);
  EXPECT(quantize(-2.5f, ch, -8, 7).q == -2.0f);
  // range ends and outside
  Quant hi = quantize(7.4f, ch, -8, 7), over = quantize(7.6f, ch, -8, 7);
  EXPECT(hi.q == 7.0f && !hi.above && over.q == 7.0f && over.above);
  Quant lo = quantize(-8.4f, ch, -8, 7), under = quantize(-8.6f, ch, -8, 7);
  EXPECT(lo.q == -8.0f && !lo.below && under.q == -8.0f && under.below);
  // zero point is rounded and clamped into the range
  EXPECT(make_channel(1.0f, 2.5f, -8, 7).zi == 2.0f);
  EXPECT(make_channel(1.0f, 3.5f, -8, 7).zi == 4.0f);
  EXPECT(make_channel(1.0f, 100.0f, -8, 7).zi == 7.0f);
  // a dynamic zero point is used as it is, even outside the range
  EXPECT(make_channel(1.0f, 100.0f, -8, 7, true).zi == 100.0f);
  EXPECT(quantize(1.0f, make_channel(1.0f, 100.0f, -8, 7, true), -8, 7).q == -93.0f);
  // with a zero point the range shifts: t = round(x/s) + zi
  const Channel z3 = make_channel(0.5f, 3.0f, 0, 15);
  EXPECT(quantize(1.0f, z3, 0, 15).q == 1.0f);
  EXPECT(quantize(-2.0f, z3, 0, 15).q == -1.5f && quantize(-2.0f, z3, 0, 15).below);
  // NaN stays NaN and is "in range"; inf saturates
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  Quant qn = quantize(nan, ch, -8, 7);
  EXPECT(std::isnan(qn.q) && !qn.below && !qn.above);
  EXPECT(quantize(inf, ch, -8, 7).q == 7.0f && quantize(-inf, ch, -8, 7).q == -8.0f);
}

static void gradients() {
  const Channel ch = make_channel(0.5f, 1.0f, -8, 7);
  // in range, STE: gx = g, ds term = g * (q - x) / s, no zero-point term
  const float x = 1.1f;
  const Quant qu = quantize(x, ch, -8, 7);
  Grad g = replaced_grad(2.0f, x, qu, ch, 0.0f, 0.0f);
  EXPECT(g.gx == 2.0f && g.gz == 0.0f && g.gs == 2.0f * ((qu.q - x) * ch.inv));
  // lambda adds lam * (x - q) to dx and -lam * (x - q) to the upstream of q
  Grad gl = replaced_grad(2.0f, x, qu, ch, 0.5f, 0.0f);
  EXPECT(gl.gx == 2.0f + 0.5f * (x - qu.q));
  // EWGS: 1 + delta * sign(g) * (x - q) / s
  Grad ge = replaced_grad(-2.0f, x, qu, ch, 0.0f, 0.25f);
  EXPECT(ge.gx == -2.0f * (1.0f + 0.25f * -1.0f * (x - qu.q) * ch.inv));
  // above the range: no x gradient; dq/ds = qmax - zi, dq/dz = -s
  const Quant over = quantize(100.0f, ch, -8, 7);
  Grad go = replaced_grad(3.0f, 100.0f, over, ch, 0.0f, 0.0f);
  EXPECT(go.gx == 0.0f && go.gs == 3.0f * (7.0f - 1.0f) && go.gz == 3.0f * -0.5f);
  const Quant under = quantize(-100.0f, ch, -8, 7);
  EXPECT(replaced_grad(1.0f, -100.0f, under, ch, 0.0f, 0.0f).gs == -8.0f - 1.0f);
  // an infinite x with lam = 0 keeps finite gradients
  const float inf = std::numeric_limits<float>::infinity();
  Grad gi = replaced_grad(1.0f, inf, quantize(inf, ch, -8, 7), ch, 0.0f, 0.0f);
  EXPECT(gi.gx == 0.0f && std::isfinite(gi.gs) && std::isfinite(gi.gz));
}

// Dynamic qparams in fp32 (no rounding to a narrower dtype): the three
// mappings, half-to-even in the zero point, the int32 cast's edges, NaN.
static void dynamic_qparams_cases() {
  const auto fp32 = [](float v) { return v; };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT(trunc_int32(-2.7f) == -2.0f && trunc_int32(2.7f) == 2.0f);
  EXPECT(trunc_int32(3e9f) == -2147483648.0f && trunc_int32(nan) == -2147483648.0f);
  EXPECT(trunc_int32(-std::numeric_limits<float>::infinity()) == -2147483648.0f);
  float s, z;
  Dynamic sym{kSymmetric, 7.5f, 1.0f / 7.5f, false, 1e-6f, 8.0f, 0.0f};
  dynamic_qparams(-1.0f, 0.5f, sym, -8.0f, 7.0f, fp32, s, z);
  EXPECT(s == 1.0f / 7.5f && z == 0.0f);
  // s = 255 / 255 = 1; lo / s = -126.5 rounds to even -126: z = -2.
  Dynamic asym{kAsymmetric, 255.0f, 1.0f / 255.0f, false, 1e-6f, 128.0f, 0.0f};
  dynamic_qparams(-126.5f, 128.5f, asym, -128.0f, 127.0f, fp32, s, z);
  EXPECT(s == 1.0f && z == -2.0f);
  // A one-signed group still spans 0: lo' = 0, z = -128.
  dynamic_qparams(3.0f, 5.1f, asym, -128.0f, 127.0f, fp32, s, z);
  EXPECT(s == 5.1f / 255.0f && z == -128.0f);
  // All-equal zeros: the scale is eps.
  dynamic_qparams(0.0f, 0.0f, asym, -128.0f, 127.0f, fp32, s, z);
  EXPECT(s == 1e-6f && z == -128.0f);
  // Per group: no range through 0, z = trunc(lo + s * 8).
  Dynamic group{kAsymmetricGroup, 15.0f, 1.0f / 15.0f, false, 1e-6f, 8.0f, 0.0f};
  dynamic_qparams(100.0f, 115.0f, group, -8.0f, 7.0f, fp32, s, z);
  EXPECT(s == 1.0f && z == 108.0f);
  dynamic_qparams(nan, nan, group, -8.0f, 7.0f, fp32, s, z);
  EXPECT(std::isnan(s) && z == -2147483648.0f);
  // CUDA's division by a Python number: times the fp32 reciprocal.
  group.by_reciprocal = true;
  dynamic_qparams(0.0f, 1.0f, group, -8.0f, 7.0f, fp32, s, z);
  EXPECT(s == 1.0f * (1.0f / 15.0f));
}

int main() {
  philox_known_answers();
  philox_uniform_lanes();
  rounding_and_clamping();
  gradients();
  dynamic_qparams_cases();
  if (failures == 0) std::printf("pege_math: all checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
