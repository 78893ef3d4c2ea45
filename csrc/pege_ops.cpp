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
using DynamicLauncher = void (*)(const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                 const QuantParams&, const Dynamic&);

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

// x viewed as groups of group_size consecutive elements of the last
// dimension; returns (y, scale, zero_point), the qparams float32 of shape
// x.shape[:-1] + (x.shape[-1] / group_size,). kCuda: torch on CUDA divides by
// a Python number as a * (1 / d), which the qparams reproduce.
template <DynamicLauncher launch, bool kCuda>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_dynamic(
    const at::Tensor& x, int64_t quant_min, int64_t quant_max, int64_t threshold,
    int64_t seed, int64_t offset, int64_t group_size, int64_t mapping, double eps, double lam,
    double delta) {
  TORCH_CHECK(x.dim() >= 1, "pege: x must have at least one dimension, got a 0-dim tensor");
  TORCH_CHECK(group_size >= 1 && x.size(-1) % group_size == 0, "pege: group_size ",
              group_size, " must be >= 1 and divide x.shape[-1] = ", x.size(-1));
  TORCH_CHECK(mapping >= kAsymmetric && mapping <= kAsymmetricGroup,
              "pege: mapping must be 0, 1 or 2, got ", mapping);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "pege: eps must be finite and > 0, got ", eps);
  auto shape = x.sizes().vec();
  shape.back() = x.size(-1) / group_size;
  auto scale = at::empty(shape, x.options().dtype(at::kFloat));
  auto zero_point = at::empty(shape, x.options().dtype(at::kFloat));
  const auto xc = x.contiguous();
  const auto p = make_params(xc.view({-1, group_size}), scale, zero_point, quant_min,
                             quant_max, threshold, seed, offset, 0, lam, delta, 1.0, true);
  const float width = static_cast<float>(quant_max - quant_min);
  Dynamic d{};
  d.mapping = static_cast<int>(mapping);
  d.divisor = mapping == kSymmetric ? width / 2 : width;
  d.inv_divisor = 1.0f / d.divisor;
  d.by_reciprocal = kCuda;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    d.eps = static_cast<float>(static_cast<decltype(tag)>(static_cast<float>(eps)));
  });
  d.mid = (width + 1) / 2;
  d.z_symmetric = std::trunc((quant_max + quant_min + 1) / 2.0f);
  auto y = new_output(x);
  if (p.numel > 0) launch(xc, y, scale, zero_point, p, d);
  return {y, scale, zero_point};
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
  m.def(
      "fake_quant_dynamic(Tensor x, int quant_min, int quant_max, int threshold, int seed, "
      "int offset, int group_size, int mapping, float eps, float lam, float delta) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("release_cpu_cache() -> int", &release_cpu_cache);
}

TORCH_LIBRARY_IMPL(pege, CPU, m) {
  m.impl("fake_quant", &fake_quant<fake_quant_cpu>);
  m.impl("fake_quant_backward", &fake_quant_backward<fake_quant_backward_cpu>);
  m.impl("replacement_mask", &replacement_mask<replacement_mask_cpu>);
  m.impl("fake_quant_dynamic", &fake_quant_dynamic<fake_quant_dynamic_cpu, false>);
}

#ifdef PEGE_WITH_CUDA
TORCH_LIBRARY_IMPL(pege, CUDA, m) {
  m.impl("fake_quant", &fake_quant<fake_quant_cuda>);
  m.impl("fake_quant_backward", &fake_quant_backward<fake_quant_backward_cuda>);
  m.impl("replacement_mask", &replacement_mask<replacement_mask_cuda>);
  m.impl("fake_quant_dynamic", &fake_quant_dynamic<fake_quant_dynamic_cuda, true>);
}
#endif

}  // namespace pege
