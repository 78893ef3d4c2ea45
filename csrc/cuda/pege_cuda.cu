// CUDA launchers and kernels; the math is pege_math.h, shared with the CPU.
//
// Every kernel works in units of whole Philox groups (four consecutive
// element indices share one Philox call), so no path pays a call per element.
// Word and element arrays are indexed only with unrolled constants, which
// keeps them in registers (no local memory).
//
//   elementwise        units of VEC = 16 bytes of elements over the flat index
//                      (4 fp32 or 8 fp16/bf16); the channel is looked up per
//                      unit, or per element when a unit spans channels. The
//                      forward, and the backward when no scale / zero-point
//                      gradient is asked for (dx only).
//   dynamic            fake_quantize_dynamic: 8, 32 or 256 threads per group
//                      reduce its min / max, derive its (s, z), then write y.
//   group_backward     learned per-group (s, z) (or per-channel, channels of
//                      the first dimension): 8, 32 or 256 threads per group
//                      write dx and reduce the group's sums straight to ds, dz.
//   backward_runs      grid (segment, channel); units of VEC elements of one
//                      channel: per-tensor, or per-channel with inner % VEC == 0.
//   backward_groups    grid (segment, channel); other per-channel layouts with
//                      inner >= 4: units are the Philox groups overlapping each
//                      run of `inner` elements of the channel.
//   backward_columns   inner < 4 (e.g. axis=-1): x as rows of W = channels *
//                      inner columns; a thread owns four adjacent columns and
//                      walks rows, so loads are coalesced along the row.
//
// Determinism: group_backward adds a group's terms in a fixed butterfly; the
// other backward kernels write fp32 partials of the scale and zero-point sums
// laid out as [segments, columns], which finalize_kernel adds in a fixed
// order. Segments, units and the order of every addition depend on the sizes
// and dtype only, never on pointer alignment (an unaligned tensor takes
// scalar loads over the same units) or the GPU. No host synchronisation
// anywhere, so the ops can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "../pege_math.h"
#include "../pege_ops.h"

namespace pege {
namespace {

constexpr int kThreads = 256;
constexpr int kColThreadsX = 32;  // backward_columns: column quads per block
constexpr int kColThreadsY = kThreads / kColThreadsX;

template <typename T, int VEC>
struct alignas(16) Pack {
  T v[VEC];
};

// The output cast, with the NaN bits of torch's CPU conversion (bf16 0x7FC0;
// fp16 0x7E00 with the sign kept) where the device intrinsics give 0x7FFF, so
// every backend returns the same bits.
template <typename T>
__device__ __forceinline__ T to_out(float v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return v != v ? at::BFloat16(0x7FC0, at::BFloat16::from_bits()) : at::BFloat16(v);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    const uint16_t nan = (__float_as_uint(v) >> 16 & 0x8000u) | 0x7E00u;
    return v != v ? at::Half(nan, at::Half::from_bits()) : at::Half(v);
  } else {
    return v;
  }
}

// Words of the 4 * G elements starting at i0 (a multiple of 4). Ratios 0
// and 1 need no Philox: constant words that compare false / true.
template <int G>
__device__ __forceinline__ void group_words(int64_t i0, const QuantParams& p,
                                            uint32_t (&w)[4 * G]) {
  const bool all = p.threshold >= (1u << 24), none = p.threshold == 0;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    U32x4 r{{0u, 0u, 0u, 0u}};
    if (none) r = U32x4{{~0u, ~0u, ~0u, ~0u}};
    if (!all && !none) r = mask_words(static_cast<uint64_t>(i0 >> 2) + g, p.seed, p.offset);
#pragma unroll
    for (int k = 0; k < 4; ++k) w[4 * g + k] = r.v[k];
  }
}

// Elements [i0, i0 + n) as fp32 (n <= VEC): one 128-bit load when the unit is
// whole and aligned, otherwise guarded scalar loads.
template <bool ALIGNED, typename T, int VEC>
__device__ __forceinline__ void load_unit(const T* __restrict__ src, int64_t i0, int n,
                                          float (&v)[VEC]) {
  if (ALIGNED && n == VEC) {
    const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(src + i0);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<float>(in.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = k < n ? static_cast<float>(src[i0 + k]) : 0.0f;
  }
}

template <bool ALIGNED, typename T, int VEC>
__device__ __forceinline__ void store_unit(T* __restrict__ dst, int64_t i0, int n,
                                           const float (&v)[VEC]) {
  if (ALIGNED && n == VEC) {
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = to_out<T>(v[k]);
    *reinterpret_cast<Pack<T, VEC>*>(dst + i0) = out;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (k < n) dst[i0 + k] = to_out<T>(v[k]);
  }
}

__device__ __forceinline__ Channel channel_at(int64_t c, const float* s, const float* z,
                                              const QuantParams& p) {
  return make_channel(s[c], z[c], p.qmin, p.qmax, p.zero_point_as_is);
}

// y of one element: the whole forward contract in one place.
__device__ __forceinline__ float forward_value(float x, Channel ch, uint32_t word,
                                               const QuantParams& p) {
  return replaced(word, p.threshold) ? quantize(x, ch, p.qmin, p.qmax).q : x;
}

// dx of one element; adds its scale / zero-point terms to acc_s / acc_z.
__device__ __forceinline__ float backward_value(float g, float x, Channel ch, uint32_t word,
                                                const QuantParams& p, float& acc_s,
                                                float& acc_z) {
  const Grad gr = replaced_grad(g, x, quantize(x, ch, p.qmin, p.qmax), ch, p.lam, p.delta);
  const bool m = replaced(word, p.threshold);
  acc_s += m ? gr.gs : 0.0f;
  acc_z += m ? gr.gz : 0.0f;
  return m ? gr.gx : g;
}

// ------------------------------------------------------------------ forward
// UNIFORM: a unit never spans two channels (per-tensor, or inner % VEC == 0).
// BACKWARD: out = dx from (g, x) with no scale / zero-point sums (the
// qparams are constants: fixed or data-derived); else out = y from x.
template <typename T, int VEC, bool UNIFORM, bool ALIGNED, bool BACKWARD>
__global__ void elementwise_kernel(const T* __restrict__ x, const T* __restrict__ g,
                                   T* __restrict__ out, const float* __restrict__ s,
                                   const float* __restrict__ z, QuantParams p) {
  const int64_t units = (p.numel + VEC - 1) / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += stride) {
    const int64_t i0 = u * VEC;
    const int n = static_cast<int>(VEC < p.numel - i0 ? VEC : p.numel - i0);
    uint32_t w[VEC];
    group_words<VEC / 4>(i0, p, w);
    float v[VEC], gv[VEC];
    load_unit<ALIGNED>(x, i0, n, v);
    if (BACKWARD) load_unit<ALIGNED>(g, i0, n, gv);
    const auto value = [&](int k, const Channel& ch) {
      float unused_s = 0.0f, unused_z = 0.0f;
      return BACKWARD ? backward_value(gv[k], v[k], ch, w[k], p, unused_s, unused_z)
                      : forward_value(v[k], ch, w[k], p);
    };
    float r[VEC];
    if (UNIFORM) {
      const Channel ch = channel_at(p.channels == 1 ? 0 : (i0 / p.inner) % p.channels, s, z, p);
#pragma unroll
      for (int k = 0; k < VEC; ++k) r[k] = value(k, ch);
    } else {
      // Walk channel runs from the unit's first element on.
      int64_t c = (i0 / p.inner) % p.channels, pos = i0 % p.inner;
      Channel ch = channel_at(c, s, z, p);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (pos == p.inner) {
          pos = 0;
          c = c + 1 == p.channels ? 0 : c + 1;
          ch = channel_at(c, s, z, p);
        }
        r[k] = value(k, ch);
        ++pos;
      }
    }
    store_unit<ALIGNED>(out, i0, n, r);
  }
}

// ------------------------------------------------------------ dynamic qparams
// fake_quant_dynamic: TPG threads per group (8 or 32: a part of a warp, or
// 256: the block), units of VEC elements (16 bytes when the group size is a
// multiple of VEC and the pointers are aligned, else VEC = 1). Pass 1 reduces
// the group's min / max (exact: the order does not matter) with shuffles;
// every thread of the group derives the same (s, z); pass 2 re-reads the
// group (L1/L2-resident) and writes y.
// Words of a unit: VEC >= 4 elements starting at a multiple of 4, or one
// element (VEC = 1: its word of its Philox group, selected without indexing).
template <int VEC>
__device__ __forceinline__ void unit_words(int64_t i0, const QuantParams& p,
                                           uint32_t (&w)[VEC]) {
  if constexpr (VEC >= 4) {
    group_words<VEC / 4>(i0, p, w);
  } else {
    uint32_t w4[4];
    group_words<1>(i0 & ~int64_t{3}, p, w4);
    const int a = static_cast<int>(i0 & 3);
    w[0] = a == 0 ? w4[0] : a == 1 ? w4[1] : a == 2 ? w4[2] : w4[3];
  }
}

// Sum of v over the TPG threads of a group, the same bits in each of them:
// a butterfly of shuffles (each pair adds the same two values), then for a
// block the warps' sums added in warp order.
template <int TPG>
__device__ __forceinline__ float group_sum(float v, float* shared) {
#pragma unroll
  for (int o = (TPG < 32 ? TPG : 32) / 2; o > 0; o >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, o);
  if (TPG == kThreads) {
    __syncthreads();  // shared's previous readers are done
    if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
    __syncthreads();
    v = 0.0f;
#pragma unroll
    for (int k = 0; k < kThreads / 32; ++k) v += shared[k];
  }
  return v;
}

template <int TPG>
__device__ __forceinline__ void group_min_max(float& lo, float& hi, bool& nan) {
  static_assert(TPG == 8 || TPG == 32 || TPG == kThreads, "threads per group");
#pragma unroll
  for (int o = (TPG < 32 ? TPG : 32) / 2; o > 0; o >>= 1) {
    const float l = __shfl_xor_sync(0xffffffffu, lo, o);
    const float h = __shfl_xor_sync(0xffffffffu, hi, o);
    lo = l < lo ? l : lo;
    hi = h > hi ? h : hi;
    nan |= __shfl_xor_sync(0xffffffffu, static_cast<int>(nan), o) != 0;
  }
  if (TPG == kThreads) {  // the block: combine the warps' results
    __shared__ float s_lo[kThreads / 32], s_hi[kThreads / 32];
    __shared__ int s_nan[kThreads / 32];
    __syncthreads();  // the previous group's reads are done
    if ((threadIdx.x & 31) == 0) {
      s_lo[threadIdx.x >> 5] = lo;
      s_hi[threadIdx.x >> 5] = hi;
      s_nan[threadIdx.x >> 5] = nan;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kThreads / 32; ++k) {
      lo = s_lo[k] < lo ? s_lo[k] : lo;
      hi = s_hi[k] > hi ? s_hi[k] : hi;
      nan |= s_nan[k] != 0;
    }
  }
}

template <typename T, int VEC, int TPG>
__global__ void dynamic_kernel(const T* __restrict__ x, T* __restrict__ y,
                               float* __restrict__ scale, float* __restrict__ zero_point,
                               QuantParams p, Dynamic d) {
  constexpr int kGroupsPerBlock = kThreads / TPG;
  const int64_t size = p.inner, units = size / VEC;  // VEC divides size
  const int lane = threadIdx.x % TPG;
  const auto in_dtype = [](float v) { return static_cast<float>(static_cast<T>(v)); };
  // Every thread runs the same number of iterations (shuffles need the whole warp).
  for (int64_t base = blockIdx.x * static_cast<int64_t>(kGroupsPerBlock); base < p.channels;
       base += static_cast<int64_t>(gridDim.x) * kGroupsPerBlock) {
    const int64_t grp = base + threadIdx.x / TPG;
    const bool active = grp < p.channels;
    const int64_t start = grp * size;
    float lo = __int_as_float(0x7f800000), hi = -lo;
    bool nan = false;
    for (int64_t u = lane; active && u < units; u += TPG) {
      float v[VEC];
      load_unit<VEC != 1>(x, start + u * VEC, VEC, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        lo = v[k] < lo ? v[k] : lo;
        hi = v[k] > hi ? v[k] : hi;
        nan |= v[k] != v[k];
      }
    }
    group_min_max<TPG>(lo, hi, nan);
    if (!active) continue;
    const float qnan = __int_as_float(0x7fc00000);
    float s, zp;
    dynamic_qparams(nan ? qnan : lo, nan ? qnan : hi, d, p.qmin, p.qmax, in_dtype, s, zp);
    if (lane == 0) {
      scale[grp] = s;
      zero_point[grp] = zp;
    }
    const Channel ch = make_channel(s, zp, p.qmin, p.qmax, true);
    for (int64_t u = lane; u < units; u += TPG) {
      const int64_t i0 = start + u * VEC;
      float v[VEC];
      load_unit<VEC != 1>(x, i0, VEC, v);
      uint32_t w[VEC];
      unit_words(i0, p, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = forward_value(v[k], ch, w[k], p);
      store_unit<VEC != 1>(y, i0, VEC, v);
    }
  }
}

// Learned per-group (s, z), or per-channel with x.shape[0] channels of at
// most kGroupInner elements: TPG threads per group write its dx and reduce its
// scale / zero-point sums (group_sum), then write ds, dz: no partials, no
// second kernel. Units of VEC elements when VEC divides the group size (loads
// of 128 bits when ALIGNED), else of one: the order of additions depends on
// the sizes and dtype only.
constexpr int64_t kGroupInner = 8192;

template <typename T, int VEC, int TPG, bool ALIGNED>
__global__ void group_backward_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                      T* __restrict__ dx, const float* __restrict__ s,
                                      const float* __restrict__ z, QuantParams p,
                                      float* __restrict__ ds, float* __restrict__ dz) {
  __shared__ float shared[2][kThreads / 32];
  constexpr int kGroupsPerBlock = kThreads / TPG;
  const int64_t size = p.inner, units = size / VEC;
  const int lane = threadIdx.x % TPG;
  for (int64_t base = blockIdx.x * static_cast<int64_t>(kGroupsPerBlock); base < p.channels;
       base += static_cast<int64_t>(gridDim.x) * kGroupsPerBlock) {
    const int64_t grp = base + threadIdx.x / TPG;
    const bool active = grp < p.channels;
    float acc_s = 0.0f, acc_z = 0.0f;
    if (active) {
      const Channel ch = channel_at(grp, s, z, p);
      for (int64_t u = lane; u < units; u += TPG) {
        const int64_t i0 = grp * size + u * VEC;
        uint32_t w[VEC];
        unit_words(i0, p, w);
        float gv[VEC], xv[VEC];
        load_unit<ALIGNED>(g, i0, VEC, gv);
        load_unit<ALIGNED>(x, i0, VEC, xv);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          gv[k] = backward_value(gv[k], xv[k], ch, w[k], p, acc_s, acc_z);
        store_unit<ALIGNED>(dx, i0, VEC, gv);
      }
    }
    acc_s = group_sum<TPG>(acc_s, shared[0]);
    acc_z = group_sum<TPG>(acc_z, shared[1]);
    if (active && lane == 0) {
      ds[grp] = p.grad_factor * acc_s;
      dz[grp] = p.grad_factor * acc_z;
    }
  }
}

// ----------------------------------------------------------------- backward
// Block-wide sum of a 1-D block in a fixed order (warp shuffles, then one
// warp over the warp sums): deterministic for a given block size.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Block sums of both accumulators to part[blockIdx.x][c] ([segments, channels]).
__device__ __forceinline__ void write_partials(float acc_s, float acc_z, int64_t c,
                                               const QuantParams& p, float* part_s,
                                               float* part_z, float* shared) {
  acc_s = block_sum(acc_s, shared);
  acc_z = block_sum(acc_z, shared);
  if (threadIdx.x == 0) {
    part_s[blockIdx.x * p.channels + c] = acc_s;
    part_z[blockIdx.x * p.channels + c] = acc_z;
  }
}

// The grid-stride walk of backward_runs and backward_groups: for each channel
// of this block's row, unit(ch, c, u, acc_s, acc_z) for every u < units of the
// channel, then the block's partial sums of the channel.
template <typename Unit>
__device__ __forceinline__ void walk_channels(const float* __restrict__ s,
                                              const float* __restrict__ z,
                                              const QuantParams& p, int64_t units,
                                              float* __restrict__ part_s,
                                              float* __restrict__ part_z, Unit unit) {
  __shared__ float shared[32];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = blockIdx.y; c < p.channels; c += gridDim.y) {
    const Channel ch = channel_at(c, s, z, p);
    float acc_s = 0.0f, acc_z = 0.0f;
    for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
         u += stride)
      unit(ch, c, u, acc_s, acc_z);
    write_partials(acc_s, acc_z, c, p, part_s, part_z, shared);
  }
}

template <typename T, int VEC, bool ALIGNED>
__global__ void backward_runs_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                     T* __restrict__ dx, const float* __restrict__ s,
                                     const float* __restrict__ z, QuantParams p,
                                     float* __restrict__ part_s, float* __restrict__ part_z) {
  const int64_t per_channel = p.numel / p.channels;  // outer * inner
  const int64_t units = (per_channel + VEC - 1) / VEC;
  walk_channels(s, z, p, units, part_s, part_z,
                [&](const Channel& ch, int64_t c, int64_t u, float& acc_s, float& acc_z) {
    const int64_t f0 = u * VEC;  // index within the channel
    const int64_t i0 =
        p.channels == 1 ? f0 : (f0 / p.inner * p.channels + c) * p.inner + f0 % p.inner;
    const int n = static_cast<int>(VEC < per_channel - f0 ? VEC : per_channel - f0);
    uint32_t w[VEC];
    group_words<VEC / 4>(i0, p, w);
    float gv[VEC], xv[VEC];
    load_unit<ALIGNED>(g, i0, n, gv);
    load_unit<ALIGNED>(x, i0, n, xv);
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (k < n) gv[k] = backward_value(gv[k], xv[k], ch, w[k], p, acc_s, acc_z);
    store_unit<ALIGNED>(dx, i0, n, gv);
  });
}

template <typename T>
__global__ void backward_groups_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                       T* __restrict__ dx, const float* __restrict__ s,
                                       const float* __restrict__ z, QuantParams p,
                                       float* __restrict__ part_s,
                                       float* __restrict__ part_z) {
  // A run of `inner` elements overlaps at most (inner + 2) / 4 + 1 groups.
  const int64_t per_run = (p.inner + 2) / 4 + 1;
  const int64_t units = p.numel / (p.channels * p.inner) * per_run;
  walk_channels(s, z, p, units, part_s, part_z,
                [&](const Channel& ch, int64_t c, int64_t u, float& acc_s, float& acc_z) {
    const int64_t start = (u / per_run * p.channels + c) * p.inner;
    const int64_t i0 = ((start >> 2) + u % per_run) * 4;  // the group's first index
    if (i0 >= start + p.inner) return;
    uint32_t w[4];
    group_words<1>(i0, p, w);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = i0 + k;
      if (i >= start && i < start + p.inner)
        dx[i] = to_out<T>(backward_value(static_cast<float>(g[i]), static_cast<float>(x[i]),
                                         ch, w[k], p, acc_s, acc_z));
    }
  });
}

// Block (32 column quads) x (8 row lanes); blockIdx.y is a segment of rows.
// Partials go to part[segment][column], columns = channels * inner.
template <typename T>
__global__ void backward_columns_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                        T* __restrict__ dx, const float* __restrict__ s,
                                        const float* __restrict__ z, QuantParams p,
                                        int64_t rows_per_segment, float* __restrict__ part_s,
                                        float* __restrict__ part_z) {
  __shared__ float shared[2][kColThreadsY][kColThreadsX * 4];
  const int64_t cols = p.channels * p.inner, rows = p.numel / cols;
  const int64_t q0 = (blockIdx.x * static_cast<int64_t>(kColThreadsX) + threadIdx.x) * 4;
  const int ty = threadIdx.y;
  Channel ch[4];
#pragma unroll
  for (int k = 0; k < 4; ++k)
    ch[k] = channel_at(q0 + k < cols ? (q0 + k) / p.inner : 0, s, z, p);
  float acc_s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc_z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t r_end = ::min(rows, (blockIdx.y + 1) * rows_per_segment);
  for (int64_t r = blockIdx.y * rows_per_segment + ty; r < r_end; r += kColThreadsY) {
    const int64_t i0 = r * cols + q0;
    // The quad's words: one group when i0 is a multiple of 4, else two
    // (a depends on the row only, so a warp takes one branch).
    const int a = static_cast<int>(i0 & 3);
    uint32_t w[8], w1[4] = {0u, 0u, 0u, 0u};
    group_words<1>(i0 - a, p, reinterpret_cast<uint32_t(&)[4]>(w));
    if (a != 0) group_words<1>(i0 - a + 4, p, w1);
#pragma unroll
    for (int k = 0; k < 4; ++k) w[4 + k] = w1[k];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (q0 + k >= cols) continue;
      const uint32_t word = a == 0 ? w[k] : a == 1 ? w[k + 1] : a == 2 ? w[k + 2] : w[k + 3];
      dx[i0 + k] = to_out<T>(backward_value(static_cast<float>(g[i0 + k]),
                                            static_cast<float>(x[i0 + k]), ch[k], word, p,
                                            acc_s[k], acc_z[k]));
    }
  }
  // Row lanes are added in order 0..7 by the first lane.
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    shared[0][ty][threadIdx.x * 4 + k] = acc_s[k];
    shared[1][ty][threadIdx.x * 4 + k] = acc_z[k];
  }
  __syncthreads();
  if (ty == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (q0 + k >= cols) continue;
      float a_s = 0.0f, a_z = 0.0f;
      for (int t = 0; t < kColThreadsY; ++t) {
        a_s += shared[0][t][threadIdx.x * 4 + k];
        a_z += shared[1][t][threadIdx.x * 4 + k];
      }
      part_s[blockIdx.y * cols + q0 + k] = a_s;
      part_z[blockIdx.y * cols + q0 + k] = a_z;
    }
  }
}

// ds[c] = grad_factor * sum over segments, then over the channel's
// `per_channel_cols` columns, of part[segment][c * per_channel_cols + col].
__global__ void finalize_kernel(const float* __restrict__ part_s,
                                const float* __restrict__ part_z, int64_t segments,
                                int64_t per_channel_cols, QuantParams p,
                                float* __restrict__ ds, float* __restrict__ dz) {
  const int64_t cols = p.channels * per_channel_cols;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       c < p.channels; c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float a = 0.0f, b = 0.0f;
    for (int64_t k = 0; k < segments; ++k)
      for (int64_t t = 0; t < per_channel_cols; ++t) {
        a += part_s[k * cols + c * per_channel_cols + t];
        b += part_z[k * cols + c * per_channel_cols + t];
      }
    ds[c] = p.grad_factor * a;
    dz[c] = p.grad_factor * b;
  }
}

__global__ void mask_kernel(bool* __restrict__ out, QuantParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       j < (p.numel + 3) / 4; j += stride) {
    uint32_t w[4];
    group_words<1>(4 * j, p, w);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (4 * j + k < p.numel) out[4 * j + k] = replaced(w[k], p.threshold);
  }
}

// ---------------------------------------------------------------- launchers
int64_t grid_for(int64_t units) {
  // Enough blocks to fill any current GPU several times; grid-stride beyond.
  return std::max<int64_t>(1, std::min<int64_t>((units + kThreads - 1) / kThreads, 65535));
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// elementwise_kernel over p.numel elements: y from x, or (BACKWARD) dx from g, x.
template <bool BACKWARD, typename T>
void launch_elementwise(const T* x, const T* g, T* out, const float* s, const float* z,
                        const QuantParams& p, bool aligned) {
  constexpr int VEC = 16 / sizeof(T);
  const bool uniform = p.channels == 1 || p.inner % VEC == 0;
  auto kernel = uniform ? (aligned ? elementwise_kernel<T, VEC, true, true, BACKWARD>
                                   : elementwise_kernel<T, VEC, true, false, BACKWARD>)
                        : (aligned ? elementwise_kernel<T, VEC, false, true, BACKWARD>
                                   : elementwise_kernel<T, VEC, false, false, BACKWARD>);
  launch(kernel, grid_for((p.numel + VEC - 1) / VEC), kThreads, x, g, out, s, z, p);
}

}  // namespace

void fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale,
                     const at::Tensor& zero_point, at::Tensor& y, const QuantParams& p) {
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_elementwise<false>(x.data_ptr<T>(), static_cast<const T*>(nullptr), y.data_ptr<T>(),
                              scale.data_ptr<float>(), zero_point.data_ptr<float>(), p,
                              aligned16(x) && aligned16(y));
  });
}

void fake_quant_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& scale, const at::Tensor& zero_point,
                              at::Tensor& dx, at::Tensor& dscale, at::Tensor& dzero_point,
                              bool qparam_grad, const QuantParams& p) {
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    const T* gp = grad.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    const float* sp = scale.data_ptr<float>();
    const float* zp = zero_point.data_ptr<float>();
    const bool aligned = aligned16(grad) && aligned16(x) && aligned16(dx);
    if (!qparam_grad) {  // dx only: one flat pass, no partial sums
      launch_elementwise<true>(xp, gp, dxp, sp, zp, p, aligned);
      return;
    }
    if (p.channels > 1 && p.numel == p.channels * p.inner && p.inner <= kGroupInner) {
      // Groups (or channels of the first dimension): one group per 8, 32 or
      // 256 threads.
      const bool vec = p.inner % VEC == 0;
      const int64_t units = vec ? p.inner / VEC : p.inner;
      const int tpg = units <= 8 ? 8 : units <= 256 ? 32 : kThreads;
      const auto pick = [&](auto vec_tag, auto aligned_tag) {
        constexpr int V = decltype(vec_tag)::value;
        constexpr bool A = decltype(aligned_tag)::value;
        return tpg == 8 ? group_backward_kernel<T, V, 8, A>
                        : tpg == 32 ? group_backward_kernel<T, V, 32, A>
                                    : group_backward_kernel<T, V, kThreads, A>;
      };
      using Vec = std::integral_constant<int, VEC>;
      using One = std::integral_constant<int, 1>;
      using Yes = std::true_type;
      using No = std::false_type;
      auto kernel = !vec ? pick(One{}, No{}) : aligned ? pick(Vec{}, Yes{}) : pick(Vec{}, No{});
      const int64_t per_block = kThreads / tpg;
      launch(kernel, std::clamp<int64_t>((p.channels + per_block - 1) / per_block, 1, 65535),
             kThreads, gp, xp, dxp, sp, zp, p, dscale.data_ptr<float>(),
             dzero_point.data_ptr<float>());
      return;
    }
    // Partials laid out [segments, channels * per_channel_cols]. Segment
    // counts are functions of the sizes only, so the order of additions is
    // the same for any alignment and on every GPU.
    int64_t segments = 1, per_channel_cols = 1;
    at::Tensor part;
    const auto partials = [&] {
      part = at::empty({2, segments * p.channels * per_channel_cols},
                       x.options().dtype(at::kFloat));
      return part.data_ptr<float>();
    };
    const int64_t ychannels = std::min<int64_t>(p.channels, 65535);
    const int64_t budget = std::max<int64_t>(1, 4096 / std::min<int64_t>(p.channels, 4096));
    if (p.channels == 1 || p.inner % VEC == 0) {
      segments = std::min(grid_for((p.numel / p.channels + VEC - 1) / VEC), budget);
      float* ps = partials();
      launch(aligned ? backward_runs_kernel<T, VEC, true> : backward_runs_kernel<T, VEC, false>,
             dim3(segments, ychannels), kThreads, gp, xp, dxp, sp, zp, p, ps,
             ps + segments * p.channels);
    } else if (p.inner >= 4) {
      const int64_t units = p.numel / (p.channels * p.inner) * ((p.inner + 2) / 4 + 1);
      segments = std::min(grid_for(units), budget);
      float* ps = partials();
      launch(backward_groups_kernel<T>, dim3(segments, ychannels), kThreads, gp, xp, dxp, sp,
             zp, p, ps, ps + segments * p.channels);
    } else {
      per_channel_cols = p.inner;
      const int64_t cols = p.channels * p.inner, rows = p.numel / cols;
      const int64_t col_blocks = (cols + 4 * kColThreadsX - 1) / (4 * kColThreadsX);
      // At least 8 rows per thread; about 4096 blocks at most.
      const int64_t max_segments = std::max<int64_t>(1, 4096 / col_blocks);
      segments = std::clamp<int64_t>((rows + 8 * kColThreadsY - 1) / (8 * kColThreadsY), 1,
                                     std::min<int64_t>(max_segments, 65535));
      const int64_t rows_per_segment = (rows + segments - 1) / segments;
      float* ps = partials();
      TORCH_CHECK(col_blocks <= 0x7FFFFFFF, "pege: too many columns for the CUDA kernel");
      launch(backward_columns_kernel<T>, dim3(col_blocks, segments),
             dim3(kColThreadsX, kColThreadsY), gp, xp, dxp, sp, zp, p, rows_per_segment, ps,
             ps + segments * cols);
    }
    float* ps = part.data_ptr<float>();
    launch(finalize_kernel, grid_for(p.channels), kThreads, ps, ps + part.size(1), segments,
           per_channel_cols, p, dscale.data_ptr<float>(), dzero_point.data_ptr<float>());
  });
}

void fake_quant_dynamic_cuda(const at::Tensor& x, at::Tensor& y, at::Tensor& scale,
                             at::Tensor& zero_point, const QuantParams& p, const Dynamic& d) {
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = p.inner % VEC == 0 && aligned16(x) && aligned16(y);
    const int64_t units = vec ? p.inner / VEC : p.inner;
    const int tpg = units <= 8 ? 8 : units <= 256 ? 32 : kThreads;
    auto kernel = vec ? (tpg == 8 ? dynamic_kernel<T, VEC, 8>
                                  : tpg == 32 ? dynamic_kernel<T, VEC, 32>
                                              : dynamic_kernel<T, VEC, kThreads>)
                      : (tpg == 8 ? dynamic_kernel<T, 1, 8>
                                  : tpg == 32 ? dynamic_kernel<T, 1, 32>
                                              : dynamic_kernel<T, 1, kThreads>);
    const int64_t per_block = kThreads / tpg;
    launch(kernel, std::clamp<int64_t>((p.channels + per_block - 1) / per_block, 1, 65535),
           kThreads, x.data_ptr<T>(), y.data_ptr<T>(), scale.data_ptr<float>(),
           zero_point.data_ptr<float>(), p, d);
  });
}

void replacement_mask_cuda(at::Tensor& mask, const QuantParams& p) {
  const c10::cuda::CUDAGuard guard(mask.device());
  launch(mask_kernel, grid_for((p.numel + 3) / 4), kThreads, mask.data_ptr<bool>(), p);
}

}  // namespace pege
