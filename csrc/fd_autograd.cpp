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
using DsmPerturbSig = std::tuple<at::Tensor, at::Tensor>(T, T, T, double, int64_t, int64_t);
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
// The gradient w.r.t. x of `blocks` stacked row blocks, each x plus something that does not depend on x
// (+-v, and FD-DSM's sigma z): the sum over the blocks.
at::Tensor stacked_blocks_backward(const at::Tensor& grad, int64_t blocks) {
  return grad.reshape({blocks, -1, grad.size(-1)}).sum(0);
}

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
    // v is not needed
    return {stacked_blocks_backward(grads[0], ctx->saved_data["blocks"].toInt()), {}, {}, {}, {}, {}};
  }
};

// ------------------------------------------------------------------------------------------- dsm_perturb
template <int NS>
struct DsmPerturb : torch::autograd::Function<DsmPerturb<NS>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& sigma,
                               const at::Tensor& seed, double eps, int64_t n_slices, int64_t kind) {
    static const auto op = find_op<NS, DsmPerturbSig>("dsm_perturb");
    ctx->saved_data["blocks"] = 2 * n_slices;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [stacked, proj] = op.call(x, sigma, seed, eps, n_slices, kind);
    ctx->mark_non_differentiable({proj});
    return {stacked, proj};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // proj = v^T z / sigma does not depend on x; sigma is not differentiated
    return {stacked_blocks_backward(grads[0], ctx->saved_data["blocks"].toInt()), {}, {}, {}, {}, {}};
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

// ------------------------------------------------------------------------------------------- eager heads
// What an FD loss computes from the model's outputs on the stacked batch, as one call and one autograd
// node: split the outputs into blocks, the quotient op, the reduction over the batch. The losses use
// these in eager mode (fdsm_ext/losses.py); under torch.compile they call the same ops one by one
// (traceable custom ops), and tests/test_losses.py checks that both give bitwise the same loss and
// gradients. Why: each of the split, reshape, unbind and mean is an op call from Python and an
// autograd node, together more than the quotient itself on small models. The quotients' formulas are
// not repeated here: these call the namespace's forward and backward ops; the glue is the blocks'
// views and the reduction, whose backward (expand, divide by B; concatenate) is what autograd's
// own nodes for them compute. Private ops (namespace fdsm_ext_eager, no fake kernels): only
// fdsm_ext/losses.py calls them, and only outside torch.compile.
enum Reduction { kMean = 0, kSum = 1, kNone = 2 };

at::Tensor reduce(const at::Tensor& per, int64_t reduction) {
  if (reduction == kMean) return per.mean();
  if (reduction == kSum) return per.sum();
  return per;
}

// d reduce(per) / d per, applied to the loss's gradient: what MeanBackward/SumBackward compute.
at::Tensor reduce_backward(const at::Tensor& grad, int64_t reduction, int64_t batch) {
  if (reduction == kMean) return grad.expand({batch}) / batch;
  if (reduction == kSum) return grad.expand({batch});
  return grad;
}

// The blocks are made with one as_strided each (a narrow, view and select each cost about as much).
// Their first-order backward reuses the forward's (saved) blocks; under create_graph it makes them again
// from the saved outputs, so that the second derivative reaches the model through them.

// f: (N,) outputs on [x; x+v_1..x+v_n; x-v_1..x-v_n], N = (1 + 2n) B -> f0 (B,), fp and fm (n, B).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ssm_blocks(const at::Tensor& f, int64_t batch) {
  const int64_t n = (f.size(0) / batch - 1) / 2, st = f.stride(0), off = f.storage_offset();
  return {f.as_strided({batch}, {st}, off), f.as_strided({n, batch}, {batch * st, st}, off + batch * st),
          f.as_strided({n, batch}, {batch * st, st}, off + (1 + n) * batch * st)};
}

template <int NS>
struct SsmHead : torch::autograd::Function<SsmHead<NS>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& f, int64_t batch, double eps, double dim_scale,
                            int64_t reduction) {
    static const auto op = find_op<NS, SsmQuotientSig>("fd_ssm_quotient");
    ctx->saved_data["batch"] = batch;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["dim_scale"] = dim_scale;
    ctx->saved_data["reduction"] = reduction;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [f0, fp, fm] = ssm_blocks(f, batch);
    ctx->save_for_backward({f, f0, fp, fm});
    return reduce(op.call(f0, fp, fm, eps, dim_scale), reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<NS, SsmQuotientBackwardSig>("fd_ssm_quotient_backward");
    const auto s = ctx->get_saved_variables();
    const int64_t batch = ctx->saved_data["batch"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble(), dim_scale = ctx->saved_data["dim_scale"].toDouble();
    auto [f0, fp, fm] = c10::GradMode::is_enabled() ? ssm_blocks(s[0], batch) : std::make_tuple(s[1], s[2], s[3]);
    const auto grad = reduce_backward(grads[0], ctx->saved_data["reduction"].toInt(), batch);
    auto [g0, gp, gm] = call_backward_op([&] { return op.call(grad, f0, fp, fm, eps, dim_scale); });
    return {at::cat({g0, gp.reshape({-1}), gm.reshape({-1})}), {}, {}, {}, {}};
  }
};

// The two halves of a (2 M, ...) tensor c, contiguous, as (n, B, d) blocks (M = n B).
std::tuple<at::Tensor, at::Tensor> halves(const at::Tensor& c, int64_t n, int64_t batch) {
  const int64_t d = c.numel() / (2 * n * batch), off = c.storage_offset();
  return {c.as_strided({n, batch, d}, {batch * d, d, 1}, off),
          c.as_strided({n, batch, d}, {batch * d, d, 1}, off + n * batch * d)};
}

// s: (2 n B, *event) scores on [x+v; x-v] -> sp, sm (n, B, d).
std::tuple<at::Tensor, at::Tensor> vr_blocks(const at::Tensor& s, int64_t n, int64_t batch) {
  return halves(s.contiguous(), n, batch);
}

template <int NS>
struct SsmVrHead : torch::autograd::Function<SsmVrHead<NS>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& seed, int64_t n_slices,
                            double eps, int64_t kind, double dim_scale, int64_t reduction) {
    static const auto op = find_op<NS, SsmVrSig>("fd_ssm_vr");
    ctx->saved_data["n_slices"] = n_slices;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["dim_scale"] = dim_scale;
    ctx->saved_data["reduction"] = reduction;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [sp, sm] = vr_blocks(s, n_slices, s.size(0) / (2 * n_slices));
    ctx->save_for_backward({s, seed, sp, sm});
    return reduce(op.call(sp, sm, seed, eps, kind, dim_scale), reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<NS, SsmVrBackwardSig>("fd_ssm_vr_backward");
    const auto saved = ctx->get_saved_variables();
    const auto& s = saved[0];
    const int64_t n = ctx->saved_data["n_slices"].toInt(), batch = s.size(0) / (2 * n);
    const double eps = ctx->saved_data["eps"].toDouble(), dim_scale = ctx->saved_data["dim_scale"].toDouble();
    const int64_t kind = ctx->saved_data["kind"].toInt();
    auto [sp, sm] = c10::GradMode::is_enabled() ? vr_blocks(s, n, batch) : std::make_tuple(saved[2], saved[3]);
    const auto grad = reduce_backward(grads[0], ctx->saved_data["reduction"].toInt(), batch);
    auto [gp, gm] = call_backward_op([&] { return op.call(grad, sp, sm, saved[1], eps, kind, dim_scale); });
    return {at::stack({gp, gm}).view(s.sizes()), {}, {}, {}, {}, {}, {}};
  }
};

// f: (2 n B,) outputs on [x~+v; x~-v] -> fp, fm (n, B).
std::tuple<at::Tensor, at::Tensor> dsm_blocks(const at::Tensor& f, int64_t batch) {
  const int64_t n = f.size(0) / (2 * batch), st = f.stride(0), off = f.storage_offset();
  return {f.as_strided({n, batch}, {batch * st, st}, off),
          f.as_strided({n, batch}, {batch * st, st}, off + n * batch * st)};
}

// FD-DSM from dsm_perturb's proj (n, B): per = c/2 mean_k r^2, r = (fp - fm)/2 + proj, c = dim_scale/eps^2.
// There is no quotient op to call (the directions and noise are done with in dsm_perturb): the forward is
// reference.fd_dsm_residual_loss's expression, op for op in ATen, and the backward the chain rule autograd
// would apply to it, in the same operations (tests/test_losses.py checks both bitwise against the
// composite). Under create_graph the backward recomputes r from the saved outputs with autograd on, so the
// second derivative reaches the model.
at::Tensor dsm_residual(const at::Tensor& fp, const at::Tensor& fm, const at::Tensor& proj) {
  const auto acc = proj.scalar_type();
  const at::Tensor diff = fp.scalar_type() == acc ? fp - fm : fp.to(acc) - fm.to(acc);
  return at::add(proj, diff, 0.5);  // proj + diff / 2 (the halving is exact)
}

struct DsmHead : torch::autograd::Function<DsmHead> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& f, const at::Tensor& proj, double eps,
                            double dim_scale, int64_t reduction) {
    const double half_c = 0.5 * dim_scale / (eps * eps);
    ctx->saved_data["half_c"] = half_c;
    ctx->saved_data["reduction"] = reduction;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [fp, fm] = dsm_blocks(f, proj.size(1));
    const at::Tensor res = dsm_residual(fp, fm, proj);
    ctx->save_for_backward({f, proj, res});
    return reduce(at::mean(res.square(), 0).mul_(half_c), reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto &f = s[0], &proj = s[1];
    const int64_t n = proj.size(0), batch = proj.size(1);
    at::Tensor res = s[2];
    if (c10::GradMode::is_enabled()) {
      auto [fp, fm] = dsm_blocks(f, batch);
      res = dsm_residual(fp, fm, proj);
    }
    const auto grad = reduce_backward(grads[0], ctx->saved_data["reduction"].toInt(), batch);
    // d/dres of mean_k(res^2) * half_c is 2 res half_c grad / n; times d res/d fp = 1/2 and d res/d fm = -1/2.
    // The 2 and 1/2 are exact, so dropping both gives autograd's bits.
    const at::Tensor gp = ((grad * ctx->saved_data["half_c"].toDouble()) / n).expand({n, batch}) * res;
    at::Tensor g = at::stack({gp, -gp});
    if (g.scalar_type() != f.scalar_type()) g = g.to(f.scalar_type());
    return {g.view(f.sizes()), {}, {}, {}, {}};
  }
};

// The heads' kernels: the namespace is an argument (0: fdsm_ext, 1: fdsm_ext_triton).
at::Tensor fd_ssm_head(const at::Tensor& f, int64_t batch, double eps, double dim_scale, int64_t reduction,
                       int64_t ns) {
  return ns == kCpp ? SsmHead<kCpp>::apply(f, batch, eps, dim_scale, reduction)
                    : SsmHead<kTriton>::apply(f, batch, eps, dim_scale, reduction);
}

at::Tensor fd_ssm_vr_head(const at::Tensor& s, const at::Tensor& seed, int64_t n_slices, double eps, int64_t kind,
                          double dim_scale, int64_t reduction, int64_t ns) {
  return ns == kCpp ? SsmVrHead<kCpp>::apply(s, seed, n_slices, eps, kind, dim_scale, reduction)
                    : SsmVrHead<kTriton>::apply(s, seed, n_slices, eps, kind, dim_scale, reduction);
}

at::Tensor fd_dsm_head(const at::Tensor& f, const at::Tensor& proj, double eps, double dim_scale,
                       int64_t reduction) {
  return DsmHead::apply(f, proj, eps, dim_scale, reduction);
}

// The Autograd kernels: the ops' own signatures, forwarding to the Functions above. Calls that need no
// autograd node go straight to the kernel: under no_grad or with no input that requires grad
// (Function::apply would build a node for nothing), and with an undefined (None) tensor argument, which
// the kernel's checks refuse by name (Function::apply would fail first, reading its device).
template <class... Ts>
bool needs_node(const Ts&... ts) {
  return c10::GradMode::is_enabled() && (ts.defined() && ...) && (ts.requires_grad() || ...);
}

template <class Sig, class... Args>
at::Tensor below_autograd(const c10::TypedOperatorHandle<Sig>& op, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(args...);
}

template <int NS>
at::Tensor perturb_autograd(const at::Tensor& x, const at::Tensor& seed, double eps, int64_t n_slices, int64_t kind,
                            bool include_center) {
  static const auto op = find_op<NS, PerturbSig>("perturb");
  if (!needs_node(x) || !seed.defined()) return below_autograd(op, x, seed, eps, n_slices, kind, include_center);
  return Perturb<NS>::apply(x, seed, eps, n_slices, kind, include_center);
}

template <int NS>
std::tuple<at::Tensor, at::Tensor> dsm_perturb_autograd(const at::Tensor& x, const at::Tensor& sigma,
                                                        const at::Tensor& seed, double eps, int64_t n_slices,
                                                        int64_t kind) {
  static const auto op = find_op<NS, DsmPerturbSig>("dsm_perturb");
  if (!needs_node(x) || !sigma.defined() || !seed.defined()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, sigma, seed, eps, n_slices, kind);
  }
  auto out = DsmPerturb<NS>::apply(x, sigma, seed, eps, n_slices, kind);
  return {out[0], out[1]};
}

template <int NS>
at::Tensor fd_ssm_quotient_autograd(const at::Tensor& f0, const at::Tensor& fp, const at::Tensor& fm, double eps,
                                    double dim_scale) {
  static const auto op = find_op<NS, SsmQuotientSig>("fd_ssm_quotient");
  if (!needs_node(f0, fp, fm)) return below_autograd(op, f0, fp, fm, eps, dim_scale);
  return SsmQuotient<NS>::apply(f0, fp, fm, eps, dim_scale);
}

template <int NS>
at::Tensor fd_ssm_vr_autograd(const at::Tensor& sp, const at::Tensor& sm, const at::Tensor& seed, double eps,
                              int64_t kind, double dim_scale) {
  static const auto op = find_op<NS, SsmVrSig>("fd_ssm_vr");
  if (!needs_node(sp, sm) || !seed.defined()) return below_autograd(op, sp, sm, seed, eps, kind, dim_scale);
  return SsmVr<NS>::apply(sp, sm, seed, eps, kind, dim_scale);
}

template <int NS>
at::Tensor fd_dsm_quotient_autograd(const at::Tensor& fp, const at::Tensor& fm, const at::Tensor& noise,
                                    const at::Tensor& sigma, const at::Tensor& seed, double eps, int64_t kind,
                                    double dim_scale) {
  static const auto op = find_op<NS, DsmQuotientSig>("fd_dsm_quotient");
  if (!needs_node(fp, fm, noise) || !sigma.defined() || !seed.defined()) {
    return below_autograd(op, fp, fm, noise, sigma, seed, eps, kind, dim_scale);
  }
  return DsmQuotient<NS>::apply(fp, fm, noise, sigma, seed, eps, kind, dim_scale);
}

template <int NS>
at::Tensor stencil_perturb_autograd(const at::Tensor& x, const at::Tensor& v, double eps, int64_t order) {
  static const auto op = find_op<NS, StencilPerturbSig>("stencil_perturb");
  if (!needs_node(x, v)) return below_autograd(op, x, v, eps, order);
  return StencilPerturb<NS>::apply(x, v, eps, order);
}

template <int NS>
at::Tensor stencil_combine_autograd(const at::Tensor& f, double eps, int64_t order) {
  static const auto op = find_op<NS, StencilCombineSig>("stencil_combine");
  if (!needs_node(f)) return below_autograd(op, f, eps, order);
  return StencilCombine<NS>::apply(f, eps, order);
}

template <int NS>
void register_autograd(torch::Library& m) {
  m.impl("perturb", &perturb_autograd<NS>);
  m.impl("dsm_perturb", &dsm_perturb_autograd<NS>);
  m.impl("fd_ssm_quotient", &fd_ssm_quotient_autograd<NS>);
  m.impl("fd_ssm_vr", &fd_ssm_vr_autograd<NS>);
  m.impl("fd_dsm_quotient", &fd_dsm_quotient_autograd<NS>);
  m.impl("stencil_perturb", &stencil_perturb_autograd<NS>);
  m.impl("stencil_combine", &stencil_combine_autograd<NS>);
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm_ext, Autograd, m) { register_autograd<kCpp>(m); }
TORCH_LIBRARY_IMPL(fdsm_ext_triton, Autograd, m) { register_autograd<kTriton>(m); }

// The eager heads: the same kernel for Autograd and, for inference mode (which skips the Autograd key),
// CompositeExplicitAutograd; Function::apply records nothing when no gradient is needed.
TORCH_LIBRARY(fdsm_ext_eager, m) {
  m.def("fd_ssm_head(Tensor f, int batch, float eps, float dim_scale, int reduction, int ns) -> Tensor");
  m.def("fd_ssm_vr_head(Tensor s, Tensor seed, int n_slices, float eps, int kind, float dim_scale, int reduction, "
        "int ns) -> Tensor");
  m.def("fd_dsm_head(Tensor f, Tensor proj, float eps, float dim_scale, int reduction) -> Tensor");
}

TORCH_LIBRARY_IMPL(fdsm_ext_eager, Autograd, m) {
  m.impl("fd_ssm_head", &fd_ssm_head);
  m.impl("fd_ssm_vr_head", &fd_ssm_vr_head);
  m.impl("fd_dsm_head", &fd_dsm_head);
}

TORCH_LIBRARY_IMPL(fdsm_ext_eager, CompositeExplicitAutograd, m) {
  m.impl("fd_ssm_head", &fd_ssm_head);
  m.impl("fd_ssm_vr_head", &fd_ssm_vr_head);
  m.impl("fd_dsm_head", &fd_dsm_head);
}

}  // namespace fdsm
