// Fused CPU kernels: one pass over memory each for forward and backward.
//
// Work is cut into chunks of a fixed size (never a function of the thread
// count) so the scale/zero-point reduction is the same on 1 or N threads.
// Inside a chunk, tiles of kTile elements first draw their Philox words
// (one call per four elements), then walk runs of elements that share a
// channel, eight or sixteen elements at a time: pege_math.h's formulas on
// GCC vectors of eight floats, and on float for the rest of a run. The hot
// functions are compiled for AVX-512, AVX2 and generic x86-64 and picked at
// load time (target_clones), so one wheel serves all.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../pege_math.h"
#include "../pege_ops.h"
#include "philox_x86.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// x86-64-v4 (AVX-512 F/BW/DQ/VL) rather than plain avx512f: without BW, 16-bit
// elements (fp16, bf16) are not handled in 512-bit registers and their loops
// run at half width. GCC 12 is the first to dispatch on it.
#define PEGE_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEGE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PEGE_MULTIVERSION
#endif

namespace pege {
namespace {

constexpr int64_t kTile = 1024;        // elements whose words sit in one buffer
constexpr int64_t kChunk = 64 * 1024;  // elements per parallel work item
constexpr int kLanes = 16;             // fp32 accumulators per run

#ifdef PEGE_HAVE_X86_PHILOX
// Which Philox routine runs, picked at load: 2 = AVX-512, 1 = AVX2, 0 = the
// portable lane code. PEGE_PHILOX=avx2 or =portable caps it, so that tests
// on any machine cover the other routines too.
const int kPhiloxIsa = [] {
  __builtin_cpu_init();  // may run before libgcc's own initialisation
  const int best =
      __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  const char* cap = std::getenv("PEGE_PHILOX");
  if (cap == nullptr) return best;
  if (std::strcmp(cap, "portable") == 0) return 0;
  if (std::strcmp(cap, "avx2") == 0) return std::min(best, 1);
  return best;
}();
#endif

// Chunks are multiples of kTile (so of 4: Philox groups never straddle two).
// With scale / zero-point sums, a chunk holds at least 16 elements per channel
// on average, so the chunk x channel partials stay below numel / 16 floats.
int64_t chunk_size(const QuantParams& p, bool sums) {
  const int64_t want = sums ? std::max<int64_t>(kChunk, 16 * p.channels) : kChunk;
  return (want + kTile - 1) / kTile * kTile;
}

std::vector<Channel> channels_of(const at::Tensor& scale, const at::Tensor& zero_point,
                                 const QuantParams& p) {
  const float* s = scale.data_ptr<float>();
  const float* z = zero_point.data_ptr<float>();
  std::vector<Channel> ch(p.channels);
  for (int64_t c = 0; c < p.channels; ++c) ch[c] = make_channel(s[c], z[c], p.qmin, p.qmax, p.zero_point_as_is);
  return ch;
}

// Zero words: with threshold 0 no word is replaced and with 2^24 every word
// is, whatever its value, so ratios 0 and 1 read these instead of drawing.
alignas(64) const uint32_t kZeroWords[kTile] = {};

// The words of elements [t0, t0 + n) (t0 a multiple of 4): kZeroWords where
// the ratio needs no random numbers, else `words`, filled in blocks of 64
// groups (256 elements, a divisor of kTile, so the buffer holds the
// overshoot): one AVX-512 or AVX2 call, or four portable calls of W = 16
// lanes (more spill on AVX2). Before each block, ahead(b) is called with the
// block's index: the caller's prefetches of its next tile, spread over the
// arithmetic so that memory works meanwhile.
template <class Ahead>
PEGE_HD const uint32_t* fill_words(uint32_t* words, int64_t t0, int64_t n,
                                  const QuantParams& p, Ahead&& ahead) {
  constexpr int W = 16;
  constexpr int64_t kBlock = 64;
  static_assert(kTile % (4 * kBlock) == 0, "fill_words writes whole blocks");
  if (p.threshold == 0 || p.threshold >= (1u << 24)) return kZeroWords;
  const uint64_t j0 = static_cast<uint64_t>(t0) >> 2;
  const int64_t groups = (n + 3) >> 2;
  // Tiles start at multiples of kTile, so j0 is a multiple of kTile / 4, a
  // divisor of 2^32: all groups of a tile share j's high word (j0 >> 32).
  static_assert((uint64_t{1} << 32) % (kTile / 4) == 0, "a tile never crosses 2^32 in j");
  for (int64_t b = 0; b < groups; b += kBlock) {
    ahead(b / kBlock);
    uint32_t* out = words + 4 * b;
#ifdef PEGE_HAVE_X86_PHILOX
    if (kPhiloxIsa == 2) {
      philox_words_avx512(out, j0 + b, kBlock, p.seed, p.offset);
      continue;
    }
    if (kPhiloxIsa == 1) {
      philox_words_avx2(out, j0 + b, kBlock, p.seed, p.offset);
      continue;
    }
#endif
    for (int64_t g = b; g < b + kBlock; g += W) {
      Lanes<W> c0, c1, c2, c3;
      for (int l = 0; l < W; ++l) c0.v[l] = static_cast<uint32_t>(j0 + g + l);
      philox_rounds_uniform(c0, c1, c2, c3, static_cast<uint32_t>(j0 >> 32),
                            static_cast<uint32_t>(p.offset), static_cast<uint32_t>(p.offset >> 32),
                            static_cast<uint32_t>(p.seed), static_cast<uint32_t>(p.seed >> 32));
      uint32_t* o = words + 4 * g;
      for (int l = 0; l < W; ++l) {
        o[4 * l + 0] = c0.v[l];
        o[4 * l + 1] = c1.v[l];
        o[4 * l + 2] = c2.v[l];
        o[4 * l + 3] = c3.v[l];
      }
    }
  }
  return words;
}

// A load of p's line into L1 that nothing waits for. An asm statement: C++
// lets the compiler delete a loop of __builtin_prefetch (no side effects).
inline void prefetch(const void* p) {
#if defined(__x86_64__) && defined(__GNUC__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Prefetches, for fill_words' block b, its share (a quarter) of the tile
// after [t0, t0 + kTile) of each input in [.., end).
template <typename T, int kInputs>
struct Ahead {
  const T* in[kInputs];
  int64_t t0, end;
  PEGE_HD void operator()(int64_t b) const {
    constexpr int64_t kPart = kTile / 4, kLine = 64 / sizeof(T);
    const int64_t from = t0 + kTile + b * kPart, to = std::min(end, from + kPart);
    for (int64_t i = from; i < to; i += kLine)
      for (int k = 0; k < kInputs; ++k) prefetch(in[k] + i);
  }
};

// Calls f(i, len, c) for each maximal run [i, i + len) of channel c inside
// [t0, t0 + n): one division per tile, none per element.
template <class F>
PEGE_HD void for_each_run(int64_t t0, int64_t n, const QuantParams& p, F&& f) {
  const int64_t end = t0 + n;
  int64_t row = t0 / p.inner;
  int64_t c = row % p.channels;
  for (int64_t i = t0; i < end; ++row) {
    const int64_t stop = std::min(end, (row + 1) * p.inner);
    f(i, stop - i, c);
    i = stop;
    if (++c == p.channels) c = 0;
  }
}

// Eight lanes (one ymm register, or two xmm).
typedef float Floats8 __attribute__((vector_size(8 * sizeof(float))));
typedef int Ints8 __attribute__((vector_size(8 * sizeof(int))));
typedef uint32_t Words8 __attribute__((vector_size(8 * sizeof(uint32_t))));
constexpr int kVec = 8;

template <typename V, typename E>
PEGE_HD V load8(const E* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

PEGE_HD void store8(float* p, Floats8 v) { std::memcpy(p, &v, sizeof v); }

// A tile of a tensor of T seen in fp32 (element i at [i - t0] of the pointer
// load / at return): fp32 tensors in place, fp16 / bf16 ones through an L1
// buffer, converted in loops that GCC vectorizes (eight conversions inside
// the element loop are not vectorized).
template <typename T>
struct Fp32Tile {
  static constexpr bool kInPlace = std::is_same_v<T, float>;
  alignas(64) float buf[kInPlace ? 1 : kTile];

  // For reading: elements [first, end) of the tile at t0.
  const float* load(const T* x, int64_t t0, int64_t first, int64_t end) {
    if constexpr (kInPlace) return x + t0;
    for (int64_t i = first; i < end; ++i) buf[i - t0] = static_cast<float>(x[i]);
    return buf;
  }
  // For writing: at(y, t0), then store(y, t0, first, end).
  float* at(T* y, int64_t t0) {
    if constexpr (kInPlace) return y + t0;
    return buf;
  }
  void store(T* y, int64_t t0, int64_t first, int64_t end) const {
    if constexpr (!kInPlace)
      for (int64_t i = first; i < end; ++i) y[i] = static_cast<T>(buf[i - t0]);
  }
};

template <typename T>
PEGE_MULTIVERSION void forward_chunk(const T* x, T* y, int64_t begin, int64_t end,
                                     const Channel* ch, const QuantParams& p) {
  // Locals, not p.*: stores through y (float*) could alias p's floats.
  const float qmin = p.qmin, qmax = p.qmax;
  const uint32_t thr = p.threshold;
  alignas(64) uint32_t words[kTile];
  Fp32Tile<T> xt, yt;
  // Tiles start at multiples of kTile (fill_words needs it); a begin between
  // two (fake_quant_dynamic's chunks of whole groups) skips the tile's head.
  for (int64_t t0 = begin / kTile * kTile; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0), first = std::max(t0, begin);
    const uint32_t* wt = fill_words(words, t0, n, p, Ahead<T, 1>{{x}, t0, end});
    const float* xf = xt.load(x, t0, first, t0 + n);
    float* yf = yt.at(y, t0);
    for_each_run(first, t0 + n - first, p,
                 [&](int64_t i, int64_t len, int64_t c) __attribute__((always_inline)) {
      const uint32_t* w = wt + (i - t0);
      const float* xr = xf + (i - t0);
      float* yr = yf + (i - t0);
      const Channel chc = ch[c];
      // y of one element (F = float, w a word) or of eight (F = Floats8).
      const auto element = [&](auto xv, auto wv) __attribute__((always_inline)) {
        return replaced(wv, thr) ? quantize(xv, chc, qmin, qmax).q : xv;
      };
      int64_t k = 0;
      for (; k + kVec <= len; k += kVec)
        store8(yr + k, element(load8<Floats8>(xr + k), load8<Words8>(w + k)));
      for (; k < len; ++k) yr[k] = element(xr[k], w[k]);
    });
    yt.store(y, t0, first, t0 + n);
  }
}

// Min and max of n elements (NaN when one is NaN, as torch.amin / amax): 8
// lanes of each, order-free (min and max are exact), NaN tracked apart.
template <typename T>
PEGE_MULTIVERSION void min_max(const T* x, int64_t n, float& lo, float& hi) {
  constexpr float kInf = __builtin_inff();
  Floats8 l = {kInf, kInf, kInf, kInf, kInf, kInf, kInf, kInf}, h = -l;
  Ints8 nan = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    Floats8 v;
    for (int j = 0; j < 8; ++j) v[j] = static_cast<float>(x[k + j]);
    l = v < l ? v : l;
    h = v > h ? v : h;
    nan |= v != v;
  }
  float lo1 = kInf, hi1 = -kInf;
  bool any_nan = false;
  for (int j = 0; j < 8; ++j) {
    lo1 = l[j] < lo1 ? l[j] : lo1;
    hi1 = h[j] > hi1 ? h[j] : hi1;
    any_nan |= nan[j] != 0;
  }
  for (; k < n; ++k) {
    const float v = static_cast<float>(x[k]);
    lo1 = v < lo1 ? v : lo1;
    hi1 = v > hi1 ? v : hi1;
    any_nan |= v != v;
  }
  lo = any_nan ? __builtin_nanf("") : lo1;
  hi = any_nan ? __builtin_nanf("") : hi1;
}

// Groups [g0, g1) of fake_quant_dynamic: their (s, z) from min / max, then
// the forward over their elements while they are still in cache.
template <typename T>
void dynamic_chunk(const T* x, T* y, float* scale, float* zero_point, Channel* ch, int64_t g0,
                   int64_t g1, const QuantParams& p, const Dynamic& d) {
  const int64_t size = p.inner;
  const auto in_dtype = [](float v) { return static_cast<float>(static_cast<T>(v)); };
  for (int64_t g = g0; g < g1; ++g) {
    float lo, hi;
    min_max(x + g * size, size, lo, hi);
    dynamic_qparams(lo, hi, d, p.qmin, p.qmax, in_dtype, scale[g], zero_point[g]);
    ch[g] = make_channel(scale[g], zero_point[g], p.qmin, p.qmax, true);
  }
  forward_chunk<T>(x, y, g0 * size, g1 * size, ch, p);
}

// kLanes fp32 accumulators as two halves of 8 (one ymm each, or two xmm): a
// single 16-float vector type would be lowered through the stack on AVX2.
static_assert(kLanes == 2 * kVec, "the accumulators are two Floats8");
struct Lanes16 {
  Floats8 lo = {}, hi = {};  // lanes 0..7, 8..15

  void add(Floats8 a, Floats8 b) {
    lo += a;
    hi += b;
  }
  // Fixed pairwise order over the kLanes lanes.
  float sum() const {
    float t[kLanes / 2];
    for (int l = 0; l < kLanes / 2; ++l) t[l] = lo[l] + hi[l];
    for (int w = kLanes / 4; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) t[l] = t[l] + t[l + w];
    return t[0];
  }
};

// Backward over one chunk. kSums: adds its scale / zero-point sums (before
// grad_factor) to part_s[c], part_z[c]; else dx only. kLam is p.lam != 0,
// kDelta p.delta != 0.
template <typename T, bool kSums, bool kLam, bool kDelta>
PEGE_MULTIVERSION void backward_chunk(const T* g, const T* x, T* dx, int64_t begin,
                                      int64_t end, const Channel* ch, const QuantParams& p,
                                      float* part_s, float* part_z) {
  const float qmin = p.qmin, qmax = p.qmax, lam = p.lam, delta = p.delta;
  const uint32_t thr = p.threshold;
  alignas(64) uint32_t words[kTile];
  Fp32Tile<T> gt, xt, dxt;
  // As in forward_chunk, a begin between two tiles skips the tile's head.
  for (int64_t t0 = begin / kTile * kTile; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0), first = std::max(t0, begin);
    const uint32_t* wt = fill_words(words, t0, n, p, Ahead<T, 2>{{g, x}, t0, end});
    const float* gf = gt.load(g, t0, first, t0 + n);
    const float* xf = xt.load(x, t0, first, t0 + n);
    float* dxf = dxt.at(dx, t0);
    for_each_run(first, t0 + n - first, p,
                 [&](int64_t i, int64_t len, int64_t c) __attribute__((always_inline)) {
      const uint32_t* w = wt + (i - t0);
      const float *gr = gf + (i - t0), *xr = xf + (i - t0);
      float* dxr = dxf + (i - t0);
      const Channel chc = ch[c];
      // dx and the scale / zero-point terms of one element (F = float, w a
      // word) or of eight (F = Floats8).
      const auto element = [&](auto gv, auto xv, auto wv) __attribute__((always_inline)) {
        using F = std::decay_t<decltype(gv)>;
        const auto d =
            replaced_grad<kLam, kDelta>(gv, xv, quantize(xv, chc, qmin, qmax), chc, lam, delta);
        const auto m = replaced(wv, thr);
        return GradOf<F>{m ? d.gx : gv, m ? d.gs : F{}, m ? d.gz : F{}};
      };
      // Lane l of (ls, lz) sums the terms k = l (mod kLanes) of the run's
      // whole blocks of kLanes; the run's last (fewer than kLanes) terms are
      // added to lane 0 in order. A fixed order that vectorizes without
      // reassociating float sums.
      Lanes16 ls, lz;
      int64_t k = 0;
      for (; k + kLanes <= len; k += kLanes) {
        const auto a =
            element(load8<Floats8>(gr + k), load8<Floats8>(xr + k), load8<Words8>(w + k));
        const auto b = element(load8<Floats8>(gr + k + kVec), load8<Floats8>(xr + k + kVec),
                               load8<Words8>(w + k + kVec));
        store8(dxr + k, a.gx);
        store8(dxr + k + kVec, b.gx);
        if constexpr (kSums) {
          ls.add(a.gs, b.gs);
          lz.add(a.gz, b.gz);
        }
      }
      for (; k < len; ++k) {
        const auto e = element(gr[k], xr[k], w[k]);
        dxr[k] = e.gx;
        if constexpr (kSums) {
          ls.lo[0] += e.gs;
          lz.lo[0] += e.gz;
        }
      }
      if constexpr (kSums) {
        part_s[c] += ls.sum();
        part_z[c] += lz.sum();
      }
    });
    dxt.store(dx, t0, first, t0 + n);
  }
}

// backward_chunk's instantiation for these flags.
template <typename T>
auto pick_backward(bool sums, bool lam, bool delta) {
  using Chunk = decltype(&backward_chunk<T, true, true, true>);
  constexpr Chunk table[2][2][2] = {
      {{backward_chunk<T, false, false, false>, backward_chunk<T, false, false, true>},
       {backward_chunk<T, false, true, false>, backward_chunk<T, false, true, true>}},
      {{backward_chunk<T, true, false, false>, backward_chunk<T, true, false, true>},
       {backward_chunk<T, true, true, false>, backward_chunk<T, true, true, true>}}};
  return table[sums][lam][delta];
}

PEGE_MULTIVERSION void mask_chunk(bool* out, int64_t begin, int64_t end,
                                  const QuantParams& p) {
  alignas(64) uint32_t words[kTile];
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    const uint32_t* wt = fill_words(words, t0, n, p, [](int64_t) {});
    for (int64_t k = 0; k < n; ++k) out[t0 + k] = replaced(wt[k], p.threshold);
  }
}

template <class F>
void for_each_chunk(const QuantParams& p, F&& f) {
  const int64_t size = chunk_size(p, false);
  const int64_t chunks = (p.numel + size - 1) / size;
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(k, k * size, std::min(p.numel, (k + 1) * size));
  });
}

}  // namespace

void fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale,
                    const at::Tensor& zero_point, at::Tensor& y, const QuantParams& p) {
  const auto ch = channels_of(scale, zero_point, p);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    for_each_chunk(p, [&](int64_t, int64_t b, int64_t e) {
      forward_chunk<T>(xp, yp, b, e, ch.data(), p);
    });
  });
}

void fake_quant_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                             const at::Tensor& scale, const at::Tensor& zero_point,
                             at::Tensor& dx, at::Tensor& dscale, at::Tensor& dzero_point,
                             bool qparam_grad, const QuantParams& p) {
  const auto ch = channels_of(scale, zero_point, p);
  // Channels that are single runs of at most kChunk elements (per group, per
  // token, per channel of the first dimension) go in chunks of whole
  // channels: each channel's sums are made in one chunk, straight into its
  // slot. Otherwise chunk x channel partials, summed over chunks in order.
  const bool whole = qparam_grad && p.channels > 1 && p.inner * p.channels == p.numel &&
                     p.inner <= kChunk;
  const int64_t per_chunk = std::max<int64_t>(1, kChunk / p.inner);  // channels, if whole
  const int64_t size = chunk_size(p, qparam_grad);
  const int64_t chunks = whole ? (p.channels + per_chunk - 1) / per_chunk
                               : (p.numel + size - 1) / size;
  const size_t parts = !qparam_grad ? 0 : whole ? p.channels : chunks * p.channels;
  std::vector<float> part_s(parts, 0.0f), part_z(parts, 0.0f);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* gp = grad.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    const auto chunk = pick_backward<T>(qparam_grad, p.lam != 0.0f, p.delta != 0.0f);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t begin = whole ? k * per_chunk * p.inner : k * size;
        const int64_t end = std::min(p.numel, whole ? (k + 1) * per_chunk * p.inner
                                                    : (k + 1) * size);
        const int64_t at = qparam_grad && !whole ? k * p.channels : 0;
        chunk(gp, xp, dxp, begin, end, ch.data(), p, part_s.data() + at, part_z.data() + at);
      }
    });
  });
  if (!qparam_grad) return;
  // Chunk by chunk, each channel's partials in chunk order (rows read in turn).
  std::vector<double> sum_s(p.channels, 0.0), sum_z(p.channels, 0.0);
  for (int64_t k = 0; k < (whole ? 1 : chunks); ++k) {
    for (int64_t c = 0; c < p.channels; ++c) {
      sum_s[c] += part_s[k * p.channels + c];
      sum_z[c] += part_z[k * p.channels + c];
    }
  }
  float* ds = dscale.data_ptr<float>();
  float* dz = dzero_point.data_ptr<float>();
  for (int64_t c = 0; c < p.channels; ++c) {
    ds[c] = static_cast<float>(p.grad_factor * sum_s[c]);
    dz[c] = static_cast<float>(p.grad_factor * sum_z[c]);
  }
}

void fake_quant_dynamic_cpu(const at::Tensor& x, at::Tensor& y, at::Tensor& scale,
                            at::Tensor& zero_point, const QuantParams& p, const Dynamic& d) {
  // Chunks of whole groups, about kDynamicChunk elements (a group at least):
  // reduced, then quantized while L2-resident.
  constexpr int64_t kDynamicChunk = 16 * 1024;
  const int64_t per_chunk = std::max<int64_t>(1, kDynamicChunk / p.inner);
  std::vector<Channel> ch(p.channels);
  float* s = scale.data_ptr<float>();
  float* z = zero_point.data_ptr<float>();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, (p.channels + per_chunk - 1) / per_chunk, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        dynamic_chunk<T>(xp, yp, s, z, ch.data(), k * per_chunk,
                         std::min(p.channels, (k + 1) * per_chunk), p, d);
    });
  });
}

void replacement_mask_cpu(at::Tensor& mask, const QuantParams& p) {
  bool* out = mask.data_ptr<bool>();
  QuantParams q = p;
  q.channels = 1;
  q.inner = std::max<int64_t>(p.numel, 1);
  for_each_chunk(q, [&](int64_t, int64_t b, int64_t e) { mask_chunk(out, b, e, q); });
}

}  // namespace pege
