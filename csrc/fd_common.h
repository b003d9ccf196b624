// Host-side helpers shared by every device's op implementations: argument
// checks, the seed tensor, output allocation (NaN-poisoned on request so that
// tests catch any element a kernel forgets to write) and dtype rules.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

namespace fdsm {

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
inline std::pair<uint64_t, uint64_t> read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 && seed.device().is_cpu(),
              "fdsm_ext: `seed` must be a CPU int64 tensor holding (seed, offset), got ",
              seed.scalar_type(), " of ", seed.numel(), " element(s) on ", seed.device());
  const at::Tensor s = seed.contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  return {static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1])};
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fdsm_ext: `", name,
              "` must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, "fdsm_ext: `eps` must be finite and > 0, got ", eps);
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

// ------------------------------------------------------------ per-op argument checks
// Shared by every device's kernels, so that an op rejects bad input identically everywhere.

inline void check_stream_rows(int64_t rows, int64_t d) {
  TORCH_CHECK(rows < (int64_t(1) << 32), "fdsm_ext: n_slices * batch must be < 2^32, got ", rows);
  TORCH_CHECK(d < (int64_t(1) << 34), "fdsm_ext: the per-sample size must be < 2^34, got ", d);
}

inline void check_perturb_args(const at::Tensor& x, double eps, int64_t n, int64_t kind) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "fdsm_ext.perturb: `x` must be 2-D (batch, features), got ", x.sizes());
  check_eps(eps);
  check_kind(kind);
  TORCH_CHECK(n >= 1, "fdsm_ext.perturb: `n_slices` must be >= 1, got ", n);
  check_stream_rows(n * x.size(0), x.size(1));
}

inline void check_quotient_args(const at::Tensor& f0, const at::Tensor& fp, const at::Tensor& fm, double eps) {
  check_float(f0, "f0");
  check_eps(eps);
  TORCH_CHECK(f0.dim() == 1, "fdsm_ext.fd_ssm_quotient: `f0` must be 1-D (batch,), got ", f0.sizes());
  TORCH_CHECK(fp.dim() == 2 && fp.size(1) == f0.size(0),
              "fdsm_ext.fd_ssm_quotient: `fp` must be (n_slices, batch) = (n, ", f0.size(0), "), got ", fp.sizes());
  check_shape(fm, "fm", fp.sizes());
  check_same(f0, "f0", fp, "fp");
  check_same(f0, "f0", fm, "fm");
}

inline void check_vr_args(const at::Tensor& sp, const at::Tensor& sm, double eps, int64_t kind) {
  check_float(sp, "sp");
  check_eps(eps);
  check_kind(kind);
  TORCH_CHECK(sp.dim() == 3, "fdsm_ext.fd_ssm_vr: `sp` must be (n_slices, batch, features), got ", sp.sizes());
  check_shape(sm, "sm", sp.sizes());
  check_same(sp, "sp", sm, "sm");
  check_stream_rows(sp.size(0) * sp.size(1), sp.size(2));
}

// FD-DSM inputs, contiguous, with noise and sigma in the accumulation dtype.
struct DsmArgs {
  at::Tensor fp, fm, noise, sigma;
  int64_t n, B, d;
};

inline DsmArgs dsm_args(const at::Tensor& fp, const at::Tensor& fm, const at::Tensor& noise,
                        const at::Tensor& sigma, double eps, int64_t kind) {
  check_float(fp, "fp");
  check_float(noise, "noise");
  check_float(sigma, "sigma");
  check_eps(eps);
  check_kind(kind);
  TORCH_CHECK(fp.dim() == 2, "fdsm_ext.fd_dsm_quotient: `fp` must be (n_slices, batch), got ", fp.sizes());
  check_shape(fm, "fm", fp.sizes());
  check_same(fp, "fp", fm, "fm");
  const int64_t n = fp.size(0), B = fp.size(1);
  TORCH_CHECK(noise.dim() == 2 && noise.size(0) == B,
              "fdsm_ext.fd_dsm_quotient: `noise` must be (batch, features) with batch ", B, ", got ", noise.sizes());
  check_shape(sigma, "sigma", {B});
  TORCH_CHECK(noise.device() == fp.device() && sigma.device() == fp.device(),
              "fdsm_ext.fd_dsm_quotient: `fp`, `noise` and `sigma` must be on one device");
  check_stream_rows(n * B, noise.size(1));
  const auto acc = at::toOpMathType(fp.scalar_type());
  return {fp.contiguous(), fm.contiguous(), noise.to(acc).contiguous(), sigma.to(acc).contiguous(), n, B,
          noise.size(1)};
}

inline void check_order(int64_t order) {
  TORCH_CHECK(order >= 1 && order <= 16, "fdsm_ext: stencil `order` must be in [1, 16], got ", order);
}

inline void check_stencil_perturb_args(const at::Tensor& x, const at::Tensor& v, double eps, int64_t order) {
  check_float(x, "x");
  check_eps(eps);
  check_order(order);
  TORCH_CHECK(x.dim() == 2, "fdsm_ext.stencil_perturb: `x` must be 2-D (batch, features), got ", x.sizes());
  check_shape(v, "v", x.sizes());
  check_same(x, "x", v, "v");
}

inline void check_stencil_grad_args(const at::Tensor& grad, double eps, int64_t order) {
  check_float(grad, "grad");
  check_eps(eps);
  check_order(order);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) % (order + 1) == 0,
              "fdsm_ext.stencil_perturb_backward: `grad` must be ((order+1)*batch, features), got ", grad.sizes());
}

inline void check_combine_args(const at::Tensor& f, double eps, int64_t order) {
  check_float(f, "f");
  check_eps(eps);
  check_order(order);
  TORCH_CHECK(f.dim() == 2 && f.size(0) == order + 1,
              "fdsm_ext.stencil_combine: `f` must be (order+1, batch) = (", order + 1, ", B), got ", f.sizes());
}

// Langevin step: x (B, *event) and score of x's shape and dtype; alpha (B,) or one element on x's
// device; seed on the CPU or on x's device (a device seed is read by the kernel, for CUDA graphs).
struct LangevinArgs {
  int64_t B, d;
  double lo, hi;  // clamp bounds, -inf / +inf when absent
};

inline LangevinArgs langevin_args(const at::Tensor& x, const at::Tensor& score, const at::Tensor& alpha,
                                  const at::Tensor& seed, std::optional<double> clamp_min,
                                  std::optional<double> clamp_max) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "fdsm_ext.langevin_step: `x` must be (batch, *event_shape), got a 0-d tensor");
  check_shape(score, "score", x.sizes());
  check_same(x, "x", score, "score");
  check_float(alpha, "alpha");
  const int64_t B = x.size(0);
  int64_t d = 1;
  for (int64_t k = 1; k < x.dim(); ++k) d *= x.size(k);
  TORCH_CHECK(alpha.device() == x.device(), "fdsm_ext.langevin_step: `alpha` is on ", alpha.device(),
              " but `x` is on ", x.device());
  TORCH_CHECK(alpha.numel() == 1 || (alpha.dim() == 1 && alpha.size(0) == B),
              "fdsm_ext.langevin_step: `alpha` must have one element or shape (", B, ",), got ", alpha.sizes());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 &&
                  (seed.device().is_cpu() || seed.device() == x.device()),
              "fdsm_ext.langevin_step: `seed` must be an int64 tensor holding (seed, offset) on the CPU or on `x`'s "
              "device, got ", seed.scalar_type(), " of ", seed.numel(), " element(s) on ", seed.device());
  const double inf = std::numeric_limits<double>::infinity();
  const double lo = clamp_min.value_or(-inf), hi = clamp_max.value_or(inf);
  TORCH_CHECK(!std::isnan(lo) && !std::isnan(hi) && lo <= hi,
              "fdsm_ext.langevin_step: need `clamp_min` <= `clamp_max` (and neither NaN), got ", lo, " and ", hi);
  check_stream_rows(B, d);
  return {B, d, lo, hi};
}

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
