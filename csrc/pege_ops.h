// Op parameters shared by the checks (pege_ops.cpp) and the launchers
// (cpu/pege_cpu.cpp, cuda/pege_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "pege_math.h"

namespace pege {

// Calls f(T{}) with T the C++ type of x's dtype (fp32, fp16, bf16).
template <class F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, "pege: unsupported dtype ", t);
  }
}

// x is walked as its contiguous copy; element i belongs to channel
// (i / inner) % channels (per-tensor: channels = 1, inner = numel).
struct QuantParams {
  int64_t numel;
  int64_t channels;
  int64_t inner;
  float qmin, qmax;
  uint32_t threshold;  // round(ratio * 2^24), in [0, 2^24]
  uint64_t seed, offset;
  float lam, delta, grad_factor;
  bool zero_point_as_is;  // dynamic qparams: zero points used as they are
};

// A contiguous tensor shaped like `like` for an op's output: on the CPU, from
// 4 MiB up, huge-page-advised memory that is reused after the tensor dies
// (cpu/output_memory.cpp); otherwise at::empty.
at::Tensor new_output(const at::Tensor& like);
// Frees the CPU output blocks kept for reuse; returns their bytes.
int64_t release_cpu_cache();

// y = m ? q : x. x contiguous; y preallocated like x.
void fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale,
                    const at::Tensor& zero_point, at::Tensor& y,
                    const QuantParams& p);
// dx, and (when qparam_grad) dscale and dzero_point, all preallocated.
void fake_quant_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                             const at::Tensor& scale,
                             const at::Tensor& zero_point, at::Tensor& dx,
                             at::Tensor& dscale, at::Tensor& dzero_point,
                             bool qparam_grad, const QuantParams& p);
void replacement_mask_cpu(at::Tensor& mask, const QuantParams& p);
// y = m ? Q(x) : x with each group's (s, z) derived from its values, written
// to scale and zero_point. x contiguous, viewed as p.channels groups of
// p.inner elements; y, scale, zero_point preallocated.
void fake_quant_dynamic_cpu(const at::Tensor& x, at::Tensor& y, at::Tensor& scale,
                            at::Tensor& zero_point, const QuantParams& p, const Dynamic& d);

#ifdef PEGE_WITH_CUDA
void fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale,
                     const at::Tensor& zero_point, at::Tensor& y,
                     const QuantParams& p);
void fake_quant_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                              const at::Tensor& scale,
                              const at::Tensor& zero_point, at::Tensor& dx,
                              at::Tensor& dscale, at::Tensor& dzero_point,
                              bool qparam_grad, const QuantParams& p);
void replacement_mask_cuda(at::Tensor& mask, const QuantParams& p);
void fake_quant_dynamic_cuda(const at::Tensor& x, at::Tensor& y, at::Tensor& scale,
                             at::Tensor& zero_point, const QuantParams& p, const Dynamic& d);
#endif

}  // namespace pege
