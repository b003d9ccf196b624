// Autograd kernels of the differentiable FD ops (perturb, the three quotients, the stencil), for both
// namespaces: fdsm_ext (the C++/CUDA kernels) and fdsm_ext_triton (the Triton kernels, defined from
// Python under the same schemas by fdsm_ext/triton/; registering a kernel for an op before its schema
// is defined is allowed, and the dispatcher checks these kernels' signatures against the schemas then).
//
// Each forward formula is "call the namespace's backward op with the saved inputs" (perturb's is a sum
// over the stacked blocks). Written in C++ rather than registered from Python with
// torch.library.register_autograd: a loss calls two of these ops per step, and the Python autograd
// kernel (the forward's custom Function, the backward's Python node) cost about 150 us per op and step,
// more than the ops themselves on small models. Double backward: a backward op called under grad mode
// (create_graph) goes through its own Autograd kernel, registered from Python in fdsm_ext/ops.py from the
// forward op's reference formula; without grad mode it is called below autograd, as nothing records it.
// torch.compile and opcheck trace through these kernels (AOTAutograd records the ops they call).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace fdsm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Namespace { kCpp = 0, kTriton = 1 };
constexpr const char* kNamespaces[] = {"fdsm_ext", "fdsm_ext_triton"};

// The typed handle of op `name` of namespace NS. Each call site keeps it in a static local, looked up on
// first use (the Triton namespace's ops are defined when fdsm_ext.triton is imported, after this library
// is loaded).
template <int NS, class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string(kNamespaces[NS]) + "::" + name).c_str(), "")
      .template typed<Signature>();
}

// The ops' signatures (csrc/fd_ops.cpp's schemas as C++ types).
using T = const at::Tensor&;
using PerturbSig = at::Tensor(T, T, double, int64_t, int64_t, bool);
using SsmQuotientSig = at::Tensor(T, T, T, double, double);
using SsmQuotientBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(T, T, T, T, double, double);
using SsmVrSig = at::Tensor(T, T, T, double, int64_t, double);
using SsmVrBackwardSig = std::tuple<at::Tensor, at::Tensor>(T, T, T, T, double, int64_t, double);
using DsmQuotientSig = at::Tensor(T, T, T, T, T, double, int64_t, double);
using DsmQuotientBackwardSig = std::tuple<at::Tensor, at::Tensor>(T, T, T, T, T, T, double, int64_t, double);
using DsmNoiseBackwardSig = at::Tensor(T, T, T, T, T, T, double, int64_t, double);
using StencilPerturbSig = at::Tensor(T, T, double, int64_t);
using StencilPerturbBackwardSig = std::tuple<at::Tensor, at::Tensor>(T, double, int64_t);
using StencilCombineSig = at::Tensor(T, double, int64_t);
using StencilCombineBackwardSig = at::Tensor(T, T, double, int64_t);

// Runs a backward op: through its own Autograd kernel when grad mode is on (create_graph: the double
// backward records it), else below autograd (first order: skips the Python kernel that would only
// redispatch).
template <class Fn>
auto call_backward_op(Fn&& fn) {
  if (c10::GradMode::is_enabled()) {
    return fn();
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return fn();
}

// ------------------------------------------------------------------------------------------- perturb
template <int NS>
struct Perturb : torch::autograd::Function<Perturb<NS>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& seed, double eps,
                            int64_t n_slices, int64_t kind, bool include_center) {
    static const auto op = find_op<NS, PerturbSig>("perturb");
    ctx->saved_data["blocks"] = static_cast<int64_t>(include_center) + 2 * n_slices;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, seed, eps, n_slices, kind, include_center);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // d(x +- v)/dx = I: the gradient is the sum over the stacked blocks; v is not needed.
    const auto& grad = grads[0];
    const int64_t blocks = ctx->saved_data["blocks"].toInt();
    return {grad.reshape({blocks, -1, grad.size(-1)}).sum(0), {}, {}, {}, {}, {}};
  }
};

// ------------------------------------------------------------------------------------------- FD-SSM
template <int NS>
struct SsmQuotient : torch::autograd::Function<SsmQuotient<NS>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& f0, const at::Tensor& fp, const at::Tensor& fm,
                            double eps, double dim_scale) {
    static const auto op = find_op<NS, SsmQuotientSig>("fd_ssm_quotient");
    ctx->save_for_backward({f0, fp, fm});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["dim_scale"] = dim_scale;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(f0, fp, fm, eps, dim_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<NS, SsmQuotientBackwardSig>("fd_ssm_quotient_backward");
    const auto s = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble(), dim_scale = ctx->saved_data["dim_scale"].toDouble();
    auto [g0, gp, gm] = call_backward_op([&] { return op.call(grads[0], s[0], s[1], s[2], eps, dim_scale); });
    return {g0, gp, gm, {}, {}};
  }
};

// ------------------------------------------------------------------------------------------- FD-SSM-VR
template <int NS>
struct SsmVr : torch::autograd::Function<SsmVr<NS>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& sp, const at::Tensor& sm, const at::Tensor& seed,
                            double eps, int64_t kind, double dim_scale) {
    static const auto op = find_op<NS, SsmVrSig>("fd_ssm_vr");
    ctx->save_for_backward({sp, sm, seed});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["dim_scale"] = dim_scale;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(sp, sm, seed, eps, kind, dim_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<NS, SsmVrBackwardSig>("fd_ssm_vr_backward");
    const auto s = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble(), dim_scale = ctx->saved_data["dim_scale"].toDouble();
    const int64_t kind = ctx->saved_data["kind"].toInt();
    auto [gp, gm] = call_backward_op([&] { return op.call(grads[0], s[0], s[1], s[2], eps, kind, dim_scale); });
    return {gp, gm, {}, {}, {}, {}};
  }
};

// ------------------------------------------------------------------------------------------- FD-DSM
template <int NS>
struct DsmQuotient : torch::autograd::Function<DsmQuotient<NS>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& fp, const at::Tensor& fm, const at::Tensor& noise,
                            const at::Tensor& sigma, const at::Tensor& seed, double eps, int64_t kind,
                            double dim_scale) {
    static const auto op = find_op<NS, DsmQuotientSig>("fd_dsm_quotient");
    ctx->save_for_backward({fp, fm, noise, sigma, seed});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["dim_scale"] = dim_scale;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(fp, fm, noise, sigma, seed, eps, kind, dim_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<NS, DsmQuotientBackwardSig>("fd_dsm_quotient_backward");
    static const auto noise_op = find_op<NS, DsmNoiseBackwardSig>("fd_dsm_noise_backward");
    const auto s = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble(), dim_scale = ctx->saved_data["dim_scale"].toDouble();
    const int64_t kind = ctx->saved_data["kind"].toInt();
    auto [gp, gm] = call_backward_op([&] {
      return op.call(grads[0], s[0], s[1], s[2], s[3], s[4], eps, kind, dim_scale);
    });
    at::Tensor gnoise;  // sigma and seed are never differentiated; noise only when it needs a gradient
    if (ctx->needs_input_grad(2)) {
      gnoise = call_backward_op([&] {
        return noise_op.call(grads[0], s[0], s[1], s[2], s[3], s[4], eps, kind, dim_scale);
      });
    }
    return {gp, gm, gnoise, {}, {}, {}, {}, {}};
  }
};

// ------------------------------------------------------------------------------------------- stencil
template <int NS>
struct StencilPerturb : torch::autograd::Function<StencilPerturb<NS>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& v, double eps,
                            int64_t order) {
    static const auto op = find_op<NS, StencilPerturbSig>("stencil_perturb");
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["order"] = order;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, v, eps, order);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The stencil is linear in (x, v): its backward needs neither, only grad.
    static const auto op = find_op<NS, StencilPerturbBackwardSig>("stencil_perturb_backward");
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t order = ctx->saved_data["order"].toInt();
    auto [gx, gv] = call_backward_op([&] { return op.call(grads[0], eps, order); });
    return {gx, gv, {}, {}};
  }
};

template <int NS>
struct StencilCombine : torch::autograd::Function<StencilCombine<NS>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& f, double eps, int64_t order) {
    static const auto op = find_op<NS, StencilCombineSig>("stencil_combine");
    ctx->save_for_backward({f});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["order"] = order;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(f, eps, order);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<NS, StencilCombineBackwardSig>("stencil_combine_backward");
    const auto s = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t order = ctx->saved_data["order"].toInt();
    auto gf = call_backward_op([&] { return op.call(grads[0], s[0], eps, order); });
    return {gf, {}, {}};
  }
};

// The Autograd kernels: the ops' own signatures, forwarding to the Functions above.
template <int NS>
at::Tensor perturb_autograd(const at::Tensor& x, const at::Tensor& seed, double eps, int64_t n_slices, int64_t kind,
                            bool include_center) {
  return Perturb<NS>::apply(x, seed, eps, n_slices, kind, include_center);
}

template <int NS>
at::Tensor fd_ssm_quotient_autograd(const at::Tensor& f0, const at::Tensor& fp, const at::Tensor& fm, double eps,
                                    double dim_scale) {
  return SsmQuotient<NS>::apply(f0, fp, fm, eps, dim_scale);
}

template <int NS>
at::Tensor fd_ssm_vr_autograd(const at::Tensor& sp, const at::Tensor& sm, const at::Tensor& seed, double eps,
                              int64_t kind, double dim_scale) {
  return SsmVr<NS>::apply(sp, sm, seed, eps, kind, dim_scale);
}

template <int NS>
at::Tensor fd_dsm_quotient_autograd(const at::Tensor& fp, const at::Tensor& fm, const at::Tensor& noise,
                                    const at::Tensor& sigma, const at::Tensor& seed, double eps, int64_t kind,
                                    double dim_scale) {
  return DsmQuotient<NS>::apply(fp, fm, noise, sigma, seed, eps, kind, dim_scale);
}

template <int NS>
at::Tensor stencil_perturb_autograd(const at::Tensor& x, const at::Tensor& v, double eps, int64_t order) {
  return StencilPerturb<NS>::apply(x, v, eps, order);
}

template <int NS>
at::Tensor stencil_combine_autograd(const at::Tensor& f, double eps, int64_t order) {
  return StencilCombine<NS>::apply(f, eps, order);
}

template <int NS>
void register_autograd(torch::Library& m) {
  m.impl("perturb", &perturb_autograd<NS>);
  m.impl("fd_ssm_quotient", &fd_ssm_quotient_autograd<NS>);
  m.impl("fd_ssm_vr", &fd_ssm_vr_autograd<NS>);
  m.impl("fd_dsm_quotient", &fd_dsm_quotient_autograd<NS>);
  m.impl("stencil_perturb", &stencil_perturb_autograd<NS>);
  m.impl("stencil_combine", &stencil_combine_autograd<NS>);
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm_ext, Autograd, m) { register_autograd<kCpp>(m); }
TORCH_LIBRARY_IMPL(fdsm_ext_triton, Autograd, m) { register_autograd<kTriton>(m); }

}  // namespace fdsm
