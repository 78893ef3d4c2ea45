// CUDA launchers and kernels; the math is pege_math.h, shared with the CPU.
//
// Each thread handles VEC = 16 bytes of elements (4 fp32 or 8 fp16/bf16) with
// one 128-bit load/store per tensor and one Philox call per four elements.
// The vector path needs 16-byte aligned pointers and whole vectors inside one
// channel run (inner % VEC == 0, or per-tensor); otherwise a scalar path runs
// (one Philox call per element). No host synchronisation anywhere: scalars go
// by value, scale/zero point are read on the device, so the ops are safe
// under CUDA graph capture.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../pege_math.h"
#include "../pege_ops.h"

namespace pege {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(16) Pack {
  T v[VEC];
};

// Word of element i within the words of its own vector (i0 = vector start, a
// multiple of 4), or a fresh Philox call on the scalar path.
struct Words {
  uint32_t v[8];
};

template <int VEC>
__device__ __forceinline__ Words vector_words(int64_t i0, const QuantParams& p) {
  Words w;
#pragma unroll
  for (int g = 0; g < VEC / 4; ++g) {
    const U32x4 r = mask_words(static_cast<uint64_t>(i0 >> 2) + g, p.seed, p.offset);
#pragma unroll
    for (int k = 0; k < 4; ++k) w.v[4 * g + k] = r.v[k];
  }
  return w;
}

__device__ __forceinline__ uint32_t element_word(int64_t i, const QuantParams& p) {
  return mask_words(static_cast<uint64_t>(i >> 2), p.seed, p.offset).v[i & 3];
}

__device__ __forceinline__ Channel channel_at(int64_t c, const float* s, const float* z,
                                              const QuantParams& p) {
  return make_channel(s[c], z[c], p.qmin, p.qmax);
}

// ------------------------------------------------------------------ forward
template <typename T, int VEC, bool VECTOR>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                               const float* __restrict__ s, const float* __restrict__ z,
                               QuantParams p) {
  const int64_t units = VECTOR ? (p.numel + VEC - 1) / VEC : p.numel;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += stride) {
    if (VECTOR) {
      const int64_t i0 = u * VEC;
      const Channel ch = channel_at((i0 / p.inner) % p.channels, s, z, p);
      const Words w = vector_words<VEC>(i0, p);
      if (i0 + VEC <= p.numel) {
        Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + i0), out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float xf = static_cast<float>(in.v[k]);
          const float q = quantize(xf, ch, p.qmin, p.qmax).q;
          out.v[k] = static_cast<T>(replaced(w.v[k], p.threshold) ? q : xf);
        }
        *reinterpret_cast<Pack<T, VEC>*>(y + i0) = out;
      } else {
        for (int64_t i = i0; i < p.numel; ++i) {
          const float xf = static_cast<float>(x[i]);
          const float q = quantize(xf, ch, p.qmin, p.qmax).q;
          y[i] = static_cast<T>(replaced(w.v[i - i0], p.threshold) ? q : xf);
        }
      }
    } else {
      const Channel ch = channel_at((u / p.inner) % p.channels, s, z, p);
      const float xf = static_cast<float>(x[u]);
      const float q = quantize(xf, ch, p.qmin, p.qmax).q;
      y[u] = static_cast<T>(replaced(element_word(u, p), p.threshold) ? q : xf);
    }
  }
}

// ----------------------------------------------------------------- backward
// Block-wide sum in a fixed order (warp shuffles, then one warp over the
// warp sums): deterministic for a given launch shape.
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

// Grid: x = segments of a channel's outer*inner elements, y = channels.
// Writes dx and per-(channel, segment) fp32 partials of the scale and
// zero-point sums; finalize_kernel adds the partials in segment order.
template <typename T, int VEC, bool VECTOR>
__global__ void backward_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                T* __restrict__ dx, const float* __restrict__ s,
                                const float* __restrict__ z, QuantParams p,
                                float* __restrict__ part_s, float* __restrict__ part_z) {
  __shared__ float shared[32];
  const int64_t per_channel = p.numel / p.channels;  // outer * inner
  const int64_t units = VECTOR ? (per_channel + VEC - 1) / VEC : per_channel;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = blockIdx.y; c < p.channels; c += gridDim.y) {
    const Channel ch = channel_at(c, s, z, p);
    float acc_s = 0.0f, acc_z = 0.0f;
    auto element = [&](int64_t i, uint32_t word, float gk, float xk, float& out) {
      const Grad gr =
          replaced_grad(gk, xk, quantize(xk, ch, p.qmin, p.qmax), ch, p.lam, p.delta);
      const bool m = replaced(word, p.threshold);
      out = m ? gr.gx : gk;
      acc_s += m ? gr.gs : 0.0f;
      acc_z += m ? gr.gz : 0.0f;
    };
    for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
         u += stride) {
      const int64_t f0 = VECTOR ? u * VEC : u;  // index within the channel
      const int64_t i0 = (f0 / p.inner * p.channels + c) * p.inner + f0 % p.inner;
      if (VECTOR && f0 + VEC <= per_channel) {
        const Words w = vector_words<VEC>(i0, p);
        const Pack<T, VEC> gv = *reinterpret_cast<const Pack<T, VEC>*>(g + i0);
        const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(x + i0);
        Pack<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float o;
          element(i0 + k, w.v[k], static_cast<float>(gv.v[k]), static_cast<float>(xv.v[k]), o);
          out.v[k] = static_cast<T>(o);
        }
        *reinterpret_cast<Pack<T, VEC>*>(dx + i0) = out;
      } else {
        // the scalar path, and the vector path's tail (per-tensor only)
        const int64_t n = VECTOR ? per_channel - f0 : 1;
        for (int64_t k = 0; k < n; ++k) {
          float o;
          element(i0 + k, element_word(i0 + k, p), static_cast<float>(g[i0 + k]),
                  static_cast<float>(x[i0 + k]), o);
          dx[i0 + k] = static_cast<T>(o);
        }
      }
    }
    acc_s = block_sum(acc_s, shared);
    acc_z = block_sum(acc_z, shared);
    if (threadIdx.x == 0) {
      part_s[c * gridDim.x + blockIdx.x] = acc_s;
      part_z[c * gridDim.x + blockIdx.x] = acc_z;
    }
  }
}

__global__ void finalize_kernel(const float* __restrict__ part_s,
                                const float* __restrict__ part_z, int64_t segments,
                                QuantParams p, float* __restrict__ ds, float* __restrict__ dz) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       c < p.channels; c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float a = 0.0f, b = 0.0f;
    for (int64_t k = 0; k < segments; ++k) {
      a += part_s[c * segments + k];
      b += part_z[c * segments + k];
    }
    ds[c] = p.grad_factor * a;
    dz[c] = p.grad_factor * b;
  }
}

__global__ void mask_kernel(bool* __restrict__ out, QuantParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       j < (p.numel + 3) / 4; j += stride) {
    const U32x4 w = mask_words(static_cast<uint64_t>(j), p.seed, p.offset);
    for (int k = 0; k < 4 && 4 * j + k < p.numel; ++k)
      out[4 * j + k] = replaced(w.v[k], p.threshold);
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

}  // namespace

void fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale,
                     const at::Tensor& zero_point, at::Tensor& y, const QuantParams& p) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    const bool vector = (p.channels == 1 || p.inner % VEC == 0) && aligned16(x) && aligned16(y);
    const int64_t units = vector ? (p.numel + VEC - 1) / VEC : p.numel;
    auto kernel = vector ? forward_kernel<T, VEC, true> : forward_kernel<T, VEC, false>;
    kernel<<<grid_for(units), kThreads, 0, stream>>>(
        x.data_ptr<T>(), y.data_ptr<T>(), scale.data_ptr<float>(),
        zero_point.data_ptr<float>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fake_quant_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& scale, const at::Tensor& zero_point,
                              at::Tensor& dx, at::Tensor& dscale, at::Tensor& dzero_point,
                              bool qparam_grad, const QuantParams& p) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    const bool vector = (p.channels == 1 || p.inner % VEC == 0) && aligned16(grad) &&
                        aligned16(x) && aligned16(dx);
    const int64_t per_channel = p.numel / p.channels;
    const int64_t units = vector ? (per_channel + VEC - 1) / VEC : per_channel;
    // Segments per channel: a function of the sizes only, so the reduction
    // order (hence the result) is the same on every GPU.
    const int64_t budget = std::max<int64_t>(1, 4096 / std::min<int64_t>(p.channels, 4096));
    const int64_t segments = std::min(grid_for(units), budget);
    const int64_t ychannels = std::min<int64_t>(p.channels, 65535);
    auto part = at::empty({2, p.channels * segments}, x.options().dtype(at::kFloat));
    float* part_s = part.data_ptr<float>();
    float* part_z = part_s + p.channels * segments;
    auto kernel = vector ? backward_kernel<T, VEC, true> : backward_kernel<T, VEC, false>;
    kernel<<<dim3(segments, ychannels), kThreads, 0, stream>>>(
        grad.data_ptr<T>(), x.data_ptr<T>(), dx.data_ptr<T>(), scale.data_ptr<float>(),
        zero_point.data_ptr<float>(), p, part_s, part_z);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (qparam_grad) {
      finalize_kernel<<<grid_for(p.channels), kThreads, 0, stream>>>(
          part_s, part_z, segments, p, dscale.data_ptr<float>(), dzero_point.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void replacement_mask_cuda(at::Tensor& mask, const QuantParams& p) {
  const c10::cuda::CUDAGuard guard(mask.device());
  mask_kernel<<<grid_for((p.numel + 3) / 4), kThreads, 0,
                c10::cuda::getCurrentCUDAStream()>>>(mask.data_ptr<bool>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pege
