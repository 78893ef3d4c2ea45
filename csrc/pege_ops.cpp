// Schemas of the pege ops (defined once), argument checks, and one impl per
// dispatch key. Fake impls and autograd live in pege_kernels/ops.py. The
// public API (pege_kernels.fake_quantize) checks every argument before it
// calls an op; the checks here guard direct torch.ops.pege calls.
#include "pege_ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

namespace pege {
namespace {

constexpr int64_t kThresholdOne = int64_t{1} << 24;

// Checks every argument, then returns the params the launchers need. Scale
// values are checked only when scale lives on the CPU: reading a GPU tensor
// would cost a host sync (see docs/method.md, "Bad input").
QuantParams make_params(const at::Tensor& x, const at::Tensor& scale,
                        const at::Tensor& zero_point, int64_t quant_min,
                        int64_t quant_max, int64_t threshold, int64_t seed,
                        int64_t offset, std::optional<int64_t> axis, double lam,
                        double delta, double grad_factor, bool zero_point_as_is) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "pege: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(quant_min < quant_max, "pege: quant_min (", quant_min,
              ") must be < quant_max (", quant_max, ")");
  TORCH_CHECK(quant_max - quant_min <= 65535 && quant_min >= -65536 && quant_max <= 65535,
              "pege: [quant_min, quant_max] must fit 16 bits, got [", quant_min, ", ",
              quant_max, "]");
  TORCH_CHECK(threshold >= 0 && threshold <= kThresholdOne,
              "pege: threshold must be in [0, 2^24], got ", threshold);
  TORCH_CHECK(seed >= 0, "pege: seed must be >= 0, got ", seed);
  TORCH_CHECK(offset >= 0, "pege: offset must be >= 0, got ", offset);
  TORCH_CHECK(lam >= 0, "pege: lam must be >= 0, got ", lam);
  TORCH_CHECK(delta >= 0, "pege: delta must be >= 0, got ", delta);
  int64_t channels = 1, inner = std::max<int64_t>(x.numel(), 1);
  if (axis.has_value()) {
    TORCH_CHECK(*axis >= -x.dim() && *axis < x.dim(), "pege: axis ", *axis,
                " out of range for x of dim ", x.dim());
    const int64_t a = *axis < 0 ? *axis + x.dim() : *axis;
    channels = x.size(a);
    inner = 1;
    for (int64_t d = a + 1; d < x.dim(); ++d) inner *= x.size(d);
    inner = std::max<int64_t>(inner, 1);
  }
  for (const auto* t : {&scale, &zero_point}) {
    const char* name = t == &scale ? "scale" : "zero_point";
    TORCH_CHECK(t->scalar_type() == at::kFloat, "pege: ", name, " must be float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "pege: ", name, " is on ", t->device(),
                " but x is on ", x.device());
    TORCH_CHECK(t->numel() == channels, "pege: ", name, " must have ", channels,
                " element(s), got ", t->numel());
  }
  // Dynamic qparams (zero_point_as_is) come from the data: a group holding
  // NaN or inf has such a scale, which the contract defines.
  if (scale.is_cpu() && scale.numel() > 0 && !zero_point_as_is) {
    const auto s = scale.contiguous();
    const float* sp = s.data_ptr<float>();
    for (int64_t c = 0; c < s.numel(); ++c)
      TORCH_CHECK(std::isfinite(sp[c]) && sp[c] > 0.0f,
                  "pege: scale must be finite and > 0, got ", sp[c], " at index ", c);
  }
  return QuantParams{x.numel(), channels, inner,
                     static_cast<float>(quant_min), static_cast<float>(quant_max),
                     static_cast<uint32_t>(threshold), static_cast<uint64_t>(seed),
                     static_cast<uint64_t>(offset), static_cast<float>(lam),
                     static_cast<float>(delta), static_cast<float>(grad_factor),
                     zero_point_as_is};
}

using FwdLauncher = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             at::Tensor&, const QuantParams&);
using BwdLauncher = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                             bool, const QuantParams&);
using MaskLauncher = void (*)(at::Tensor&, const QuantParams&);

template <FwdLauncher launch>
at::Tensor fake_quant(const at::Tensor& x, const at::Tensor& scale,
                      const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                      int64_t threshold, int64_t seed, int64_t offset,
                      std::optional<int64_t> axis, double lam, double delta,
                      double grad_factor, bool zero_point_as_is) {
  const auto p = make_params(x, scale, zero_point, quant_min, quant_max, threshold, seed,
                             offset, axis, lam, delta, grad_factor, zero_point_as_is);
  // The mask is defined on the row-major logical index, so a non-contiguous
  // x is walked as its contiguous copy (one extra pass, only for such views).
  const auto xc = x.contiguous();
  auto y = new_output(x);
  if (p.numel > 0) launch(xc, scale.contiguous(), zero_point.contiguous(), y, p);
  return y;
}

template <BwdLauncher launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    int64_t threshold, int64_t seed, int64_t offset, std::optional<int64_t> axis,
    double lam, double delta, double grad_factor, bool qparam_grad, bool zero_point_as_is) {
  const auto p = make_params(x, scale, zero_point, quant_min, quant_max, threshold, seed,
                             offset, axis, lam, delta, grad_factor, zero_point_as_is);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              "pege: grad must match x in shape, dtype and device");
  auto dx = new_output(x);
  auto ds = at::zeros(scale.sizes(), scale.options());
  auto dz = at::zeros(zero_point.sizes(), zero_point.options());
  if (p.numel > 0)
    launch(grad.contiguous(), x.contiguous(), scale.contiguous(), zero_point.contiguous(),
           dx, ds, dz, qparam_grad, p);
  return {dx, ds, dz};
}

template <MaskLauncher launch>
at::Tensor replacement_mask(const at::Tensor& like, int64_t threshold, int64_t seed,
                            int64_t offset) {
  TORCH_CHECK(threshold >= 0 && threshold <= kThresholdOne,
              "pege: threshold must be in [0, 2^24], got ", threshold);
  TORCH_CHECK(seed >= 0 && offset >= 0, "pege: seed and offset must be >= 0");
  auto mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  QuantParams p{};
  p.numel = like.numel();
  p.threshold = static_cast<uint32_t>(threshold);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  if (p.numel > 0) launch(mask, p);
  return mask;
}

}  // namespace

TORCH_LIBRARY(pege, m) {
  m.def(
      "fake_quant(Tensor x, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, int threshold, int seed, int offset, int? axis, float lam, "
      "float delta, float grad_factor, bool zero_point_as_is=False) -> Tensor");
  m.def(
      "fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, "
      "int quant_min, int quant_max, int threshold, int seed, int offset, int? axis, "
      "float lam, float delta, float grad_factor, bool qparam_grad, "
      "bool zero_point_as_is=False) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("replacement_mask(Tensor like, int threshold, int seed, int offset) -> Tensor");
  m.def("release_cpu_cache() -> int", &release_cpu_cache);
}

TORCH_LIBRARY_IMPL(pege, CPU, m) {
  m.impl("fake_quant", &fake_quant<fake_quant_cpu>);
  m.impl("fake_quant_backward", &fake_quant_backward<fake_quant_backward_cpu>);
  m.impl("replacement_mask", &replacement_mask<replacement_mask_cpu>);
}

#ifdef PEGE_WITH_CUDA
TORCH_LIBRARY_IMPL(pege, CUDA, m) {
  m.impl("fake_quant", &fake_quant<fake_quant_cuda>);
  m.impl("fake_quant_backward", &fake_quant_backward<fake_quant_backward_cuda>);
  m.impl("replacement_mask", &replacement_mask<replacement_mask_cuda>);
}
#endif

}  // namespace pege
