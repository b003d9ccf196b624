// Autograd kernel of the Langevin step, for every device. The step is a sampler's update that
// nothing differentiates through (EBM training treats samples as constants), so instead of outputs
// that silently cut the graph it refuses inputs that need a gradient, then runs the device kernel
// below autograd. Written in C++ rather than registered from ops.py: a sampler calls it every step,
// and a Python autograd kernel costs more than the step on small batches.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fdsm {
namespace {

void refuse_grad(const char* name, const at::Tensor& x, const at::Tensor& score, const at::Tensor& alpha,
                 const std::optional<at::Tensor>& noise_scale) {
  const bool b_grad = noise_scale.has_value() && noise_scale->defined() && noise_scale->requires_grad();
  TORCH_CHECK(!c10::GradMode::is_enabled() || !(x.requires_grad() || score.requires_grad() || alpha.requires_grad() ||
                                                b_grad),
              "fdsm_ext.", name, " is not differentiable, but `x`, `score`, `alpha` or `noise_scale` requires grad: "
              "pass "
              "detached tensors or call it under torch.no_grad() (the samplers do)");
}

std::tuple<at::Tensor, at::Tensor> langevin_step_autograd(const at::Tensor& x, const at::Tensor& score,
                                                          const at::Tensor& alpha, const at::Tensor& seed,
                                                          std::optional<double> clamp_min,
                                                          std::optional<double> clamp_max, bool return_norms,
                                                          const std::optional<at::Tensor>& noise_scale) {
  refuse_grad("langevin_step", x, score, alpha, noise_scale);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fdsm_ext::langevin_step", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 std::optional<double>, std::optional<double>, bool,
                                                                 const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, score, alpha, seed, clamp_min, clamp_max, return_norms, noise_scale);
}

at::Tensor langevin_step_inplace_autograd(at::Tensor& x, const at::Tensor& score, const at::Tensor& alpha,
                                          const at::Tensor& seed, std::optional<double> clamp_min,
                                          std::optional<double> clamp_max, bool return_norms,
                                          const std::optional<at::Tensor>& noise_scale) {
  refuse_grad("langevin_step_", x, score, alpha, noise_scale);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fdsm_ext::langevin_step_", "")
                       .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         std::optional<double>, std::optional<double>, bool,
                                         const std::optional<at::Tensor>&)>();
  at::Tensor norms;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    norms = op.call(x, score, alpha, seed, clamp_min, clamp_max, return_norms, noise_scale);
  }
  // What ADInplaceOrView does for aten's in-place ops: a backward that saved x now fails loudly.
  x.unsafeGetTensorImpl()->bump_version();
  return norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm_ext, Autograd, m) {
  m.impl("langevin_step", &langevin_step_autograd);
  m.impl("langevin_step_", &langevin_step_inplace_autograd);
}

}  // namespace fdsm
