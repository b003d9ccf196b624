// Host-side helpers shared by every device's op implementations: argument
// checks, the seed tensor, output allocation (NaN-poisoned on request so that
// tests catch any element a kernel forgets to write) and dtype rules.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <utility>

namespace fdsm {

// The dtypes of every kernel: float, double, half and bfloat16 (the last two computed in float).
#define FD_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Whether freshly allocated outputs are filled with NaN before a kernel writes
// them. Off by default (it costs a pass over memory); the test suite turns it on.
bool poison_outputs_enabled();

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor out = at::empty(sizes, opts);
  if (poison_outputs_enabled()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// Losses of half/bfloat16 inputs are returned in float32: the FD quotient
// cancels digits, and the value is accumulated in float32 anyway.
inline at::ScalarType loss_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// The (seed, offset) pair: an int64 tensor of two elements, on the CPU.
// Checked by the op's check function (check_seed) before.
inline std::pair<uint64_t, uint64_t> read_seed(const at::Tensor& seed) {
  const at::Tensor s = seed.contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  return {static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1])};
}

// ------------------------------------------------------------ argument checks
// One check function per op, with the op's own signature: every device's kernel of the op calls it
// first, and fd_ops.cpp registers it as the op `fdsm_ext::_check_<op>`, which the Triton kernels call:
// so each op's checks are written once and reject bad input identically on every backend. Every
// message names the op and the argument.

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Every tensor given (None arrives as an undefined tensor) and all on the device of the first.
inline void check_tensors(const char* op, std::initializer_list<NamedTensor> args) {
  for (const auto& [name, t] : args)
    TORCH_CHECK(t->defined(), "fdsm_ext.", op, ": `", name, "` is None; expected a tensor");
  const auto& [n0, t0] = *args.begin();
  for (const auto& [name, t] : args)
    TORCH_CHECK(t->device() == t0->device(), "fdsm_ext.", op, ": `", name, "` is on ", t->device(), " but `", n0,
                "` is on ", t0->device(), "; every tensor argument but `seed` must be on one device");
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fdsm_ext: `", name,
              "` must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, "fdsm_ext: `eps` must be finite and > 0, got ", eps);
}

// The FD quotients scale by dim_scale / eps^2: both finite, and the scale representable in double.
inline void check_quotient_scale(double eps, double dim_scale) {
  check_eps(eps);
  TORCH_CHECK(std::isfinite(dim_scale), "fdsm_ext: `dim_scale` must be finite, got ", dim_scale);
  TORCH_CHECK(std::isfinite(dim_scale / (eps * eps)) && eps * eps > 0.0, "fdsm_ext: `eps` = ", eps,
              " is too small: dim_scale / eps^2 overflows a double");
}

// v = eps * u with |u_j| < 6: x +- v must not overflow x's dtype for every eps accepted.
inline void check_eps_for(double eps, at::ScalarType t) {
  check_eps(eps);
  const double max = t == at::kHalf ? 65504.0 : (t == at::kFloat || t == at::kBFloat16) ? 3.4e38 : 1.79e308;
  TORCH_CHECK(eps <= max / 16.0, "fdsm_ext: `eps` = ", eps, " overflows ", t, " (at most ", max / 16.0, ")");
}

inline void check_kind(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "fdsm_ext: direction `kind` must be 0 (sphere), 1 (rademacher) or 2 (gaussian), got ", kind);
}

inline void check_same(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "fdsm_ext: `", na, "` is on ", a.device(), " but `", nb, "` is on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fdsm_ext: `", na, "` is ", a.scalar_type(), " but `", nb, "` is ", b.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "fdsm_ext: `", name, "` must have shape ", expected, ", got ", t.sizes());
}

// The (seed, offset) pair of the FD ops: an int64 tensor of two elements, on the CPU.
inline void check_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.defined(), "fdsm_ext: `seed` is None; expected a CPU int64 tensor holding (seed, offset)");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 && seed.device().is_cpu(),
              "fdsm_ext: `seed` must be a CPU int64 tensor holding (seed, offset), got ", seed.scalar_type(), " of ",
              seed.numel(), " element(s) on ", seed.device());
}

// The gradient of a per-sample loss: floating point, (B,).
inline void check_loss_grad(const at::Tensor& grad, int64_t B) {
  check_float(grad, "grad");
  check_shape(grad, "grad", {B});
}

// The direction stream's counter holds the row (slice * B + sample) in 32 bits and the Philox group
// (element / 4) in 32 bits. `what` names the argument that sets the row count.
inline void check_stream_rows(int64_t n, int64_t B, int64_t d, const char* what, const char* holder) {
  constexpr int64_t kRows = int64_t(1) << 32;
  TORCH_CHECK(n >= 0 && B >= 0 && (B == 0 || n <= (kRows - 1) / B), "fdsm_ext: `", what,
              "` * batch must be < 2^32 (the direction stream's row counter), got ", what, " = ", n, " with batch ", B);
  TORCH_CHECK(d < (int64_t(1) << 34), "fdsm_ext: the per-sample size (features of `", holder,
              "`) must be < 2^34, got ", d);
}

inline void check_slices(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(0) >= 1, "fdsm_ext: `", name, "` must hold at least one slice (n_slices >= 1), got shape ",
              t.sizes());
}

inline void check_perturb(const at::Tensor& x, const at::Tensor& seed, double eps, int64_t n, int64_t kind,
                          bool include_center) {
  check_tensors("perturb", {{"x", &x}});
  check_seed(seed);
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "fdsm_ext.perturb: `x` must be 2-D (batch, features), got ", x.sizes());
  check_eps_for(eps, x.scalar_type());
  check_kind(kind);
  TORCH_CHECK(n >= 1, "fdsm_ext.perturb: `n_slices` must be >= 1, got ", n);
  check_stream_rows(n, x.size(0), x.size(1), "n_slices", "x");
}

// FD-DSM's noisy, perturbed batch: x (B, d), sigma (B,); the noise z_i is stream row n_slices * B + i,
// after the n_slices * B direction rows, so (n_slices + 1) * B rows must fit the row counter.
inline void check_dsm_perturb(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& seed, double eps,
                              int64_t n, int64_t kind) {
  check_tensors("dsm_perturb", {{"x", &x}, {"sigma", &sigma}});
  check_seed(seed);
  check_float(x, "x");
  check_float(sigma, "sigma");
  TORCH_CHECK(x.dim() == 2, "fdsm_ext.dsm_perturb: `x` must be 2-D (batch, features), got ", x.sizes());
  check_shape(sigma, "sigma", {x.size(0)});
  check_eps_for(eps, x.scalar_type());
  check_kind(kind);
  TORCH_CHECK(n >= 1, "fdsm_ext.dsm_perturb: `n_slices` must be >= 1, got ", n);
  const int64_t B = x.size(0);
  TORCH_CHECK(B == 0 || n <= ((int64_t(1) << 32) - 1) / B - 1, "fdsm_ext.dsm_perturb: (`n_slices` + 1) * batch (the ",
              "direction rows, then the noise rows) must be < 2^32, got n_slices = ", n, " with batch ", B);
  check_stream_rows(n, B, x.size(1), "n_slices", "x");
}

inline void check_fd_ssm_quotient(const at::Tensor& f0, const at::Tensor& fp, const at::Tensor& fm, double eps,
                                  double dim_scale) {
  check_tensors("fd_ssm_quotient", {{"f0", &f0}, {"fp", &fp}, {"fm", &fm}});
  check_float(f0, "f0");
  check_quotient_scale(eps, dim_scale);
  TORCH_CHECK(f0.dim() == 1, "fdsm_ext.fd_ssm_quotient: `f0` must be 1-D (batch,), got ", f0.sizes());
  TORCH_CHECK(fp.dim() == 2 && fp.size(1) == f0.size(0),
              "fdsm_ext.fd_ssm_quotient: `fp` must be (n_slices, batch) = (n, ", f0.size(0), "), got ", fp.sizes());
  check_slices(fp, "fp");
  check_shape(fm, "fm", fp.sizes());
  check_same(f0, "f0", fp, "fp");
  check_same(f0, "f0", fm, "fm");
}

inline void check_fd_ssm_quotient_backward(const at::Tensor& grad, const at::Tensor& f0, const at::Tensor& fp,
                                           const at::Tensor& fm, double eps, double dim_scale) {
  check_tensors("fd_ssm_quotient_backward", {{"f0", &f0}, {"fp", &fp}, {"fm", &fm}, {"grad", &grad}});
  check_fd_ssm_quotient(f0, fp, fm, eps, dim_scale);
  check_loss_grad(grad, f0.size(0));
}

// A score's outputs on the two halves of a perturb(include_center=false) batch: sp, sm (n, B, d), alike,
// with their n B direction rows within the stream's row counter. `op` names the caller.
inline void check_score_blocks(const char* op, const at::Tensor& sp, const at::Tensor& sm) {
  TORCH_CHECK(sp.dim() == 3, "fdsm_ext.", op, ": `sp` must be (n_slices, batch, features), got ", sp.sizes());
  check_slices(sp, "sp");
  check_shape(sm, "sm", sp.sizes());
  check_same(sp, "sp", sm, "sm");
  check_stream_rows(sp.size(0), sp.size(1), sp.size(2), "n_slices", "sp");
}

inline void check_fd_ssm_vr(const at::Tensor& sp, const at::Tensor& sm, const at::Tensor& seed, double eps,
                            int64_t kind, double dim_scale) {
  check_tensors("fd_ssm_vr", {{"sp", &sp}, {"sm", &sm}});
  check_seed(seed);
  check_float(sp, "sp");
  check_quotient_scale(eps, dim_scale);
  check_kind(kind);
  check_score_blocks("fd_ssm_vr", sp, sm);
}

inline void check_fd_ssm_vr_backward(const at::Tensor& grad, const at::Tensor& sp, const at::Tensor& sm,
                                     const at::Tensor& seed, double eps, int64_t kind, double dim_scale) {
  check_tensors("fd_ssm_vr_backward", {{"sp", &sp}, {"sm", &sm}, {"grad", &grad}});
  check_fd_ssm_vr(sp, sm, seed, eps, kind, dim_scale);
  check_loss_grad(grad, sp.size(1));
}

inline void check_fd_dsm_quotient(const at::Tensor& fp, const at::Tensor& fm, const at::Tensor& noise,
                                  const at::Tensor& sigma, const at::Tensor& seed, double eps, int64_t kind,
                                  double dim_scale) {
  check_tensors("fd_dsm_quotient", {{"fp", &fp}, {"fm", &fm}, {"noise", &noise}, {"sigma", &sigma}});
  check_seed(seed);
  check_float(fp, "fp");
  check_float(noise, "noise");
  check_float(sigma, "sigma");
  check_quotient_scale(eps, dim_scale);
  check_kind(kind);
  TORCH_CHECK(fp.dim() == 2, "fdsm_ext.fd_dsm_quotient: `fp` must be (n_slices, batch), got ", fp.sizes());
  check_slices(fp, "fp");
  check_shape(fm, "fm", fp.sizes());
  check_same(fp, "fp", fm, "fm");
  const int64_t B = fp.size(1);
  TORCH_CHECK(noise.dim() == 2 && noise.size(0) == B,
              "fdsm_ext.fd_dsm_quotient: `noise` must be (batch, features) with batch ", B, ", got ", noise.sizes());
  check_shape(sigma, "sigma", {B});
  check_stream_rows(fp.size(0), B, noise.size(1), "n_slices", "noise");
}

// Both FD-DSM backward ops take the forward's arguments and the loss gradient; `op` names the caller.
inline void check_fd_dsm_backward(const char* op, const at::Tensor& grad, const at::Tensor& fp, const at::Tensor& fm,
                                  const at::Tensor& noise, const at::Tensor& sigma, const at::Tensor& seed,
                                  double eps, int64_t kind, double dim_scale) {
  check_tensors(op, {{"fp", &fp}, {"fm", &fm}, {"noise", &noise}, {"sigma", &sigma}, {"grad", &grad}});
  check_fd_dsm_quotient(fp, fm, noise, sigma, seed, eps, kind, dim_scale);
  check_loss_grad(grad, fp.size(1));
}

inline void check_fd_dsm_quotient_backward(const at::Tensor& grad, const at::Tensor& fp, const at::Tensor& fm,
                                           const at::Tensor& noise, const at::Tensor& sigma, const at::Tensor& seed,
                                           double eps, int64_t kind, double dim_scale) {
  check_fd_dsm_backward("fd_dsm_quotient_backward", grad, fp, fm, noise, sigma, seed, eps, kind, dim_scale);
}

inline void check_fd_dsm_noise_backward(const at::Tensor& grad, const at::Tensor& fp, const at::Tensor& fm,
                                        const at::Tensor& noise, const at::Tensor& sigma, const at::Tensor& seed,
                                        double eps, int64_t kind, double dim_scale) {
  check_fd_dsm_backward("fd_dsm_noise_backward", grad, fp, fm, noise, sigma, seed, eps, kind, dim_scale);
}

// The stencil's weights (2 eps)^-T and shifts T eps must be finite, nonzero doubles.
inline void check_stencil_eps(double eps, int64_t order) {
  check_eps(eps);
  TORCH_CHECK(order >= 1 && order <= 16, "fdsm_ext: stencil `order` must be in [1, 16], got ", order);
  const double span = std::pow(2.0 * eps, static_cast<double>(order));
  TORCH_CHECK(std::isnormal(span) && std::isfinite(1.0 / span) && std::isfinite(eps * static_cast<double>(order)),
              "fdsm_ext: `eps` = ", eps, " is out of range for a stencil of order ", order,
              ": (2 eps)^order must be a finite, normal double");
}

inline void check_stencil_perturb(const at::Tensor& x, const at::Tensor& v, double eps, int64_t order) {
  check_tensors("stencil_perturb", {{"x", &x}, {"v", &v}});
  check_float(x, "x");
  check_stencil_eps(eps, order);
  TORCH_CHECK(x.dim() == 2, "fdsm_ext.stencil_perturb: `x` must be 2-D (batch, features), got ", x.sizes());
  check_shape(v, "v", x.sizes());
  check_same(x, "x", v, "v");
}

inline void check_stencil_perturb_backward(const at::Tensor& grad, double eps, int64_t order) {
  check_tensors("stencil_perturb_backward", {{"grad", &grad}});
  check_float(grad, "grad");
  check_stencil_eps(eps, order);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) % (order + 1) == 0,
              "fdsm_ext.stencil_perturb_backward: `grad` must be ((order+1)*batch, features), got ", grad.sizes());
}

inline void check_stencil_combine(const at::Tensor& f, double eps, int64_t order) {
  check_tensors("stencil_combine", {{"f", &f}});
  check_float(f, "f");
  check_stencil_eps(eps, order);
  TORCH_CHECK(f.dim() == 2 && f.size(0) == order + 1,
              "fdsm_ext.stencil_combine: `f` must be (order+1, batch) = (", order + 1, ", B), got ", f.sizes());
}

inline void check_stencil_combine_backward(const at::Tensor& grad, const at::Tensor& f, double eps, int64_t order) {
  check_tensors("stencil_combine_backward", {{"f", &f}, {"grad", &grad}});
  check_stencil_combine(f, eps, order);
  check_loss_grad(grad, f.size(1));
}

// FD divergence: sp = s(x+v), sm = s(x-v) (n, B, d) as fd_ssm_vr; no dim_scale (the scale is d).
inline void check_fd_divergence(const at::Tensor& sp, const at::Tensor& sm, const at::Tensor& seed, double eps,
                                int64_t kind) {
  check_tensors("fd_divergence", {{"sp", &sp}, {"sm", &sm}});
  check_seed(seed);
  check_float(sp, "sp");
  check_eps(eps);
  check_kind(kind);
  check_score_blocks("fd_divergence", sp, sm);
  TORCH_CHECK(std::isfinite(static_cast<double>(sp.size(2)) / (2.0 * eps * eps)), "fdsm_ext.fd_divergence: `eps` = ",
              eps, " is too small: features / (2 eps^2) overflows a double");
}

// Its gradient is per (slice, sample): grad is (n, B), floating point.
inline void check_fd_divergence_backward(const at::Tensor& grad, const at::Tensor& sp, const at::Tensor& sm,
                                         const at::Tensor& seed, double eps, int64_t kind) {
  check_tensors("fd_divergence_backward", {{"sp", &sp}, {"sm", &sm}, {"grad", &grad}});
  check_fd_divergence(sp, sm, seed, eps, kind);
  check_float(grad, "grad");
  check_shape(grad, "grad", {sp.size(0), sp.size(1)});
}

// ------------------------------------------------------------ host setup
// Shared by the CPU and CUDA kernels of each op, after its check: contiguous inputs and sizes (one
// struct per op), the per-sample loss output and its incoming gradient in the loss dtype.

inline at::Tensor new_loss_output(const at::Tensor& like, int64_t B) {
  return new_output({B}, like.options().dtype(loss_dtype(like.scalar_type())));
}

inline at::Tensor loss_grad(const at::Tensor& grad, const at::Tensor& like) {
  return grad.to(loss_dtype(like.scalar_type())).contiguous();
}

struct QuotientArgs {
  at::Tensor f0, fp, fm;
  int64_t n, B;
};

inline QuotientArgs quotient_args(const at::Tensor& f0, const at::Tensor& fp, const at::Tensor& fm) {
  return {f0.contiguous(), fp.contiguous(), fm.contiguous(), fp.size(0), f0.size(0)};
}

struct VrArgs {
  at::Tensor sp, sm;
  int64_t n, B, d;
};

inline VrArgs vr_args(const at::Tensor& sp, const at::Tensor& sm) {
  return {sp.contiguous(), sm.contiguous(), sp.size(0), sp.size(1), sp.size(2)};
}

// FD-DSM inputs, contiguous, with noise and sigma in the accumulation dtype.
struct DsmArgs {
  at::Tensor fp, fm, noise, sigma;
  int64_t n, B, d;
};

inline DsmArgs dsm_args(const at::Tensor& fp, const at::Tensor& fm, const at::Tensor& noise,
                        const at::Tensor& sigma) {
  const auto acc = at::toOpMathType(fp.scalar_type());
  return {fp.contiguous(), fm.contiguous(), noise.to(acc).contiguous(), sigma.to(acc).contiguous(), fp.size(0),
          fp.size(1), noise.size(1)};
}

// The byte range [lo, hi) of t's elements within its storage.
inline std::pair<int64_t, int64_t> storage_bytes(const at::Tensor& t) {
  int64_t lo = t.storage_offset(), hi = t.storage_offset();
  for (int64_t k = 0; k < t.dim(); ++k) {
    const int64_t span = (t.size(k) - 1) * t.stride(k);
    (span < 0 ? lo : hi) += span;
  }
  return {lo * static_cast<int64_t>(t.element_size()), (hi + 1) * static_cast<int64_t>(t.element_size())};
}

// Whether a and b may share memory (as at::get_overlap_status, with a byte-range test where that says
// "too hard", e.g. for strided tensors: interleaved views of one buffer count as overlapping).
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  const auto [alo, ahi] = storage_bytes(a);
  const auto [blo, bhi] = storage_bytes(b);
  return alo < bhi && blo < ahi;
}

// Langevin step: x (B, *event) and score of x's shape and dtype; alpha (B,) or one element on x's
// device, and so noise_scale when given; seed on the CPU or on x's device (a device seed is read by
// the kernel, for CUDA graphs).
struct LangevinArgs {
  int64_t B, d;
  double lo, hi;  // clamp bounds, -inf / +inf when absent
};

inline LangevinArgs langevin_args(const at::Tensor& x, const at::Tensor& score, const at::Tensor& alpha,
                                  std::optional<double> clamp_min, std::optional<double> clamp_max) {
  const int64_t B = x.size(0);
  int64_t d = 1;
  for (int64_t k = 1; k < x.dim(); ++k) d *= x.size(k);
  const double inf = std::numeric_limits<double>::infinity();
  return {B, d, clamp_min.value_or(-inf), clamp_max.value_or(inf)};
}

// The Langevin step: x_new = clamp(x + alpha_i s + b_i z) with b = noise_scale, or b = sqrt(2 alpha_i)
// when noise_scale is None (the VE predictor passes alpha = delta, noise_scale = sqrt(delta);
// noise_scale is last, with a default, so that callers of the plain step need not name it). x and
// score are (B, *event) of one dtype; alpha and noise_scale are (B,) or one element, any float dtype,
// on x's device (tensors, not floats, so that a captured CUDA graph can change them between replays).
// z is the gaussian Philox stream: element j of sample i is lane j & 3 of block (j >> 2, i, offset)
// under key seed. seed is the int64 (seed, offset) pair, on the CPU or on x's device; a device seed
// is read by the kernel at run time (CUDA-graph replay sees updates to it). The clamp bounds are
// optional (NaN passes through). norms is (3, B) = (||s||, ||z||, ||x_new||) per sample in the loss
// dtype when return_norms, else (3, 0). The in-place form writes x_new into x and returns norms; x
// must not overlap score, alpha, seed or noise_scale in memory.
inline void check_langevin_step(const at::Tensor& x, const at::Tensor& score, const at::Tensor& alpha,
                                const at::Tensor& seed, std::optional<double> clamp_min,
                                std::optional<double> clamp_max, bool return_norms,
                                const std::optional<at::Tensor>& noise_scale) {
  check_tensors("langevin_step", {{"x", &x}, {"score", &score}, {"alpha", &alpha}});
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "fdsm_ext.langevin_step: `x` must be (batch, *event_shape), got a 0-d tensor");
  check_shape(score, "score", x.sizes());
  check_same(x, "x", score, "score");
  check_float(alpha, "alpha");
  const int64_t B = x.size(0);
  int64_t d = 1;
  for (int64_t k = 1; k < x.dim(); ++k) d *= x.size(k);
  TORCH_CHECK(alpha.numel() == 1 || (alpha.dim() == 1 && alpha.size(0) == B),
              "fdsm_ext.langevin_step: `alpha` must have one element or shape (", B, ",), got ", alpha.sizes());
  // noise_scale (b of x + a s + b z; None: sqrt(2 alpha)) follows alpha's rules.
  if (noise_scale.has_value() && noise_scale->defined()) {
    const at::Tensor& b = *noise_scale;
    TORCH_CHECK(b.device() == x.device(), "fdsm_ext.langevin_step: `noise_scale` is on ", b.device(), " but `x` is on ",
                x.device(), "; every tensor argument but `seed` must be on one device");
    check_float(b, "noise_scale");
    TORCH_CHECK(b.numel() == 1 || (b.dim() == 1 && b.size(0) == B),
                "fdsm_ext.langevin_step: `noise_scale` must be None, or have one element or shape (", B, ",), got ",
                b.sizes());
  }
  TORCH_CHECK(seed.defined(), "fdsm_ext.langevin_step: `seed` is None; expected an int64 tensor holding (seed, offset)");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 &&
                  (seed.device().is_cpu() || seed.device() == x.device()),
              "fdsm_ext.langevin_step: `seed` must be an int64 tensor holding (seed, offset) on the CPU or on `x`'s "
              "device, got ", seed.scalar_type(), " of ", seed.numel(), " element(s) on ", seed.device());
  const double inf = std::numeric_limits<double>::infinity();
  const double lo = clamp_min.value_or(-inf), hi = clamp_max.value_or(inf);
  TORCH_CHECK(!std::isnan(lo) && !std::isnan(hi) && lo <= hi,
              "fdsm_ext.langevin_step: need `clamp_min` <= `clamp_max` (and neither NaN), got ", lo, " and ", hi);
  TORCH_CHECK(B < (int64_t(1) << 32), "fdsm_ext.langevin_step: the batch must be < 2^32 (the noise stream's row "
              "counter), got ", B);
  TORCH_CHECK(d < (int64_t(1) << 34), "fdsm_ext: the per-sample size (features of `x`) must be < 2^34, got ", d);
}

// The in-place step also needs an x it can write element by element: no element of x shares memory
// with another (an expanded x), nor with score, alpha, seed or noise_scale, which the kernels read while
// writing x.
inline void check_langevin_step_(const at::Tensor& x, const at::Tensor& score, const at::Tensor& alpha,
                                 const at::Tensor& seed, std::optional<double> clamp_min,
                                 std::optional<double> clamp_max, bool return_norms,
                                 const std::optional<at::Tensor>& noise_scale) {
  check_langevin_step(x, score, alpha, seed, clamp_min, clamp_max, return_norms, noise_scale);
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes,
              "fdsm_ext.langevin_step_: `x` has elements that share memory (an expanded tensor?), so it cannot be "
              "written in place; pass x.clone()");
  for (const auto& [name, t] : {NamedTensor{"score", &score}, NamedTensor{"alpha", &alpha}, NamedTensor{"seed", &seed}})
    TORCH_CHECK(!may_overlap(x, *t), "fdsm_ext.langevin_step_: `", name, "` overlaps `x` in memory, which the step "
                "writes while reading it; pass ", name, ".clone()");
  if (noise_scale.has_value() && noise_scale->defined())
    TORCH_CHECK(!may_overlap(x, *noise_scale), "fdsm_ext.langevin_step_: `noise_scale` overlaps `x` in memory, which "
                "the step writes while reading it; pass noise_scale.clone()");
}

// ------------------------------------------------------------ the op list
// Every op of the fdsm_ext namespace, with its schema: OP(name, "args", "returns") for an op whose
// check_<name> above takes the op's own arguments; INPLACE_OP(name, "args", "check args", "returns") for
// an op that writes an argument (its check takes the arguments without the alias annotation).
// fd_ops.cpp expands the list into TORCH_LIBRARY(fdsm_ext): each op, and `_check_<name>`, which runs
// check_<name> (the Triton kernels call it). A new op adds its line here, next to its check.
#define FDSM_OPS(OP, INPLACE_OP)                                                                                  \
  /* Stacked batch [x; x+v_1..x+v_n; x-v_1..x-v_n] (the x block only when include_center): x is (B, d), the     \
     result ((include_center + 2n) B, d); row k*B+i of each +-block uses direction row k*B+i of the stream. */ \
  OP(perturb, "Tensor x, Tensor seed, float eps, int n_slices, int kind, bool include_center", "Tensor")         \
  /* FD-DSM's stacked batch [x~+v_1..x~+v_n; x~-v_1..x~-v_n], x~ = x + sigma z, and proj (n, B) = v^T z / sigma:  \
     z_i is the raw gaussian stream row n*B+i, v as perturb's; proj in the loss dtype. */                        \
  OP(dsm_perturb, "Tensor x, Tensor sigma, Tensor seed, float eps, int n_slices, int kind", "(Tensor, Tensor)")  \
  /* Per-sample FD-SSM loss, mean over slices: f0 (B,), fp and fm (n, B). */                                     \
  OP(fd_ssm_quotient, "Tensor f0, Tensor fp, Tensor fm, float eps, float dim_scale", "Tensor")                   \
  OP(fd_ssm_quotient_backward, "Tensor grad, Tensor f0, Tensor fp, Tensor fm, float eps, float dim_scale",       \
     "(Tensor, Tensor, Tensor)")                                                                                 \
  /* Per-sample FD-SSM-VR loss: sp = s(x+v), sm = s(x-v), both (n, B, d); v regenerated from seed. */            \
  OP(fd_ssm_vr, "Tensor sp, Tensor sm, Tensor seed, float eps, int kind, float dim_scale", "Tensor")             \
  OP(fd_ssm_vr_backward, "Tensor grad, Tensor sp, Tensor sm, Tensor seed, float eps, int kind, float dim_scale", \
     "(Tensor, Tensor)")                                                                                         \
  /* Per-sample FD-DSM loss: fp, fm (n, B) at x~ +- v, noise = x~ - x (B, d), sigma (B,). */                     \
  OP(fd_dsm_quotient,                                                                                            \
     "Tensor fp, Tensor fm, Tensor noise, Tensor sigma, Tensor seed, float eps, int kind, float dim_scale",      \
     "Tensor")                                                                                                   \
  OP(fd_dsm_quotient_backward,                                                                                   \
     "Tensor grad, Tensor fp, Tensor fm, Tensor noise, Tensor sigma, Tensor seed, float eps, int kind, "         \
     "float dim_scale",                                                                                          \
     "(Tensor, Tensor)")                                                                                         \
  /* Gradient w.r.t. noise, a separate op since noise rarely requires grad. */                                   \
  OP(fd_dsm_noise_backward,                                                                                      \
     "Tensor grad, Tensor fp, Tensor fm, Tensor noise, Tensor sigma, Tensor seed, float eps, int kind, "         \
     "float dim_scale",                                                                                          \
     "Tensor")                                                                                                   \
  /* Order-T stencil: rows t*B+i hold x_i + (T - 2t) eps v_i, t = 0..T. */                                       \
  OP(stencil_perturb, "Tensor x, Tensor v, float eps, int order", "Tensor")                                      \
  OP(stencil_perturb_backward, "Tensor grad, float eps, int order", "(Tensor, Tensor)")                          \
  /* (2 eps)^-T sum_t (-1)^t C(T, t) f[t]: f is (T+1, B), the result (B,). */                                    \
  OP(stencil_combine, "Tensor f, float eps, int order", "Tensor")                                                \
  OP(stencil_combine_backward, "Tensor grad, Tensor f, float eps, int order", "Tensor")                          \
  /* FD divergence (docs/math.md "FD divergence"): div (n, B) = d / (2 eps^2) v^T (sp - sm) per (slice, sample), \
     sp = s(x+v), sm = s(x-v) (n, B, d) from perturb(x, seed, eps, n, kind, false); v regenerated from seed. */ \
  OP(fd_divergence, "Tensor sp, Tensor sm, Tensor seed, float eps, int kind", "Tensor")                         \
  OP(fd_divergence_backward, "Tensor grad, Tensor sp, Tensor sm, Tensor seed, float eps, int kind",             \
     "(Tensor, Tensor)")                                                                                         \
  /* Langevin step (docs/math.md "Langevin dynamics"), one pass: see check_langevin_step. */                   \
  OP(langevin_step,                                                                                              \
     "Tensor x, Tensor score, Tensor alpha, Tensor seed, float? clamp_min, float? clamp_max, bool return_norms, " \
     "Tensor? noise_scale=None",                                                                                 \
     "(Tensor, Tensor)")                                                                                         \
  INPLACE_OP(langevin_step_,                                                                                     \
             "Tensor(a!) x, Tensor score, Tensor alpha, Tensor seed, float? clamp_min, float? clamp_max, "       \
             "bool return_norms, Tensor? noise_scale=None",                                                      \
             "Tensor x, Tensor score, Tensor alpha, Tensor seed, float? clamp_min, float? clamp_max, "           \
             "bool return_norms, Tensor? noise_scale=None",                                                      \
             "Tensor")

// The in-place step of any-strided x through step(src, out), a device's kernel from a contiguous src
// into out (which may be src itself: each element is read before it is written): a contiguous x is
// stepped where it is, a strided one through a contiguous copy written back. Returns step's result.
template <typename Step>
at::Tensor step_in_place(at::Tensor& x, Step step) {
  if (x.is_contiguous()) return step(x, x);
  at::Tensor work = x.contiguous();
  at::Tensor result = step(work, work);
  x.copy_(work);
  return result;
}

}  // namespace fdsm
