// CPU kernels of every fdsm_ext op. Rows are independent, so each kernel is an
// at::parallel_for over rows (samples); per-row sums are accumulated in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../fd_common.h"
#include "../fd_math.h"
#include "directions_cpu.h"

namespace fdsm {
namespace {

// Rows per parallel_for task: about 16K elements of work per task.
int64_t grain_rows(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

// sum_{j < d} term(j) in double, as kSumLanes interleaved partial sums that the compiler keeps in vector
// registers: one chain of dependent double adds costs an add's latency (3-4 cycles) per element.
// Always inlined: into each clone of the per-row loops below, so each clone's sum is compiled for its ISA.
#if defined(__GNUC__)
#define FDSM_INLINE __attribute__((always_inline)) inline
#else
#define FDSM_INLINE inline
#endif
constexpr int kSumLanes = 8;
template <typename Term>
FDSM_INLINE double row_sum(int64_t d, Term term) {
  double part[kSumLanes] = {};
  int64_t j = 0;
  for (; j + kSumLanes <= d; j += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) part[l] += static_cast<double>(term(j + l));
  double total = 0.0;
  for (; j < d; ++j) total += static_cast<double>(term(j));
  for (int l = 0; l < kSumLanes; ++l) total += part[l];
  return total;
}

// ------------------------------------------------------------------ per-row loops of the drawing kernels
// One template per loop. The float instantiation is also compiled for AVX2 (the float overloads: GCC's
// target_clones picks a clone by cpuid when the library loads); every clone runs the same IEEE operations
// in the same order (row_sum's partial sums are explicit lanes), so the bits do not depend on the ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FDSM_ROW_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FDSM_ROW_CLONES
#endif

// plus = x + v, minus = x - v (v = raw * scale), and centre = x when centre is not null.
template <typename scalar_t, typename acc_t>
FDSM_INLINE void perturb_row_loop(const scalar_t* xr, const float* raw, acc_t scale, scalar_t* centre,
                                  scalar_t* plus, scalar_t* minus, int64_t d) {
  const auto body = [&](auto write_centre) {
    for (int64_t j = 0; j < d; ++j) {
      const acc_t v = static_cast<acc_t>(raw[j]) * scale;
      const acc_t xv = static_cast<acc_t>(xr[j]);
      if constexpr (decltype(write_centre)::value) centre[j] = xr[j];
      plus[j] = static_cast<scalar_t>(xv + v);
      minus[j] = static_cast<scalar_t>(xv - v);
    }
  };
  if (centre != nullptr)
    body(std::true_type{});
  else
    body(std::false_type{});
}

// FD-DSM's noisy sample x~ = x + sigma z in acc (z: the raw noise values).
template <typename scalar_t, typename acc_t>
FDSM_INLINE void dsm_noisy_row_loop(const scalar_t* __restrict__ xr, const float* __restrict__ z, acc_t sigma,
                                    acc_t* __restrict__ xt, int64_t d) {
  for (int64_t j = 0; j < d; ++j) xt[j] = static_cast<acc_t>(xr[j]) + sigma * static_cast<acc_t>(z[j]);
}

// FD-DSM's rows of one slice: plus = x~ + v, minus = x~ - v (v = raw * scale, x~ in acc), and the row's
// v^T z. Two loops, so that each vectorises (one loop with the stores and the sum does not).
template <typename scalar_t, typename acc_t>
FDSM_INLINE double dsm_perturb_row_loop(const acc_t* __restrict__ xt, const float* __restrict__ z,
                                        const float* __restrict__ raw, acc_t scale, scalar_t* __restrict__ plus,
                                        scalar_t* __restrict__ minus, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    const acc_t v = static_cast<acc_t>(raw[j]) * scale;
    plus[j] = static_cast<scalar_t>(xt[j] + v);
    minus[j] = static_cast<scalar_t>(xt[j] - v);
  }
  return row_sum(d, [&](int64_t j) { return (static_cast<acc_t>(raw[j]) * scale) * static_cast<acc_t>(z[j]); });
}

// sum_j fd_ssm_vr_elem(s+_j, s-_j, v_j, k) of one row.
template <typename scalar_t, typename acc_t>
FDSM_INLINE double vr_row_loop(const scalar_t* pr, const scalar_t* mr, const float* raw, acc_t scale, acc_t k,
                               int64_t d) {
  return row_sum(d, [&](int64_t j) {
    return fd_ssm_vr_elem<acc_t>(static_cast<acc_t>(pr[j]), static_cast<acc_t>(mr[j]),
                                 static_cast<acc_t>(raw[j]) * scale, k);
  });
}

// The gradients of one row of fd_ssm_vr, scaled by the sample's gi.
template <typename scalar_t, typename acc_t>
FDSM_INLINE void vr_backward_row_loop(const scalar_t* pr, const scalar_t* mr, const float* raw, acc_t scale, acc_t k,
                                      acc_t gi, scalar_t* gpr, scalar_t* gmr, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    const acc_t pv = static_cast<acc_t>(pr[j]), mv = static_cast<acc_t>(mr[j]);
    const acc_t v = static_cast<acc_t>(raw[j]) * scale;
    gpr[j] = static_cast<scalar_t>(gi * fd_ssm_vr_dsp<acc_t>(pv, mv, v, k));
    gmr[j] = static_cast<scalar_t>(gi * fd_ssm_vr_dsm<acc_t>(pv, mv, v, k));
  }
}

// v^T w of one row (the FD-DSM projection).
template <typename acc_t>
FDSM_INLINE double dsm_proj_row_loop(const float* raw, acc_t scale, const acc_t* w, int64_t d) {
  return row_sum(d, [&](int64_t j) { return (static_cast<acc_t>(raw[j]) * scale) * w[j]; });
}

// The loops by dtype: the overloads for float, compiled twice, are picked over the templates.
template <typename scalar_t, typename acc_t>
inline void perturb_row(const scalar_t* xr, const float* raw, acc_t scale, scalar_t* centre, scalar_t* plus,
                        scalar_t* minus, int64_t d) {
  perturb_row_loop<scalar_t, acc_t>(xr, raw, scale, centre, plus, minus, d);
}
FDSM_ROW_CLONES void perturb_row(const float* xr, const float* raw, float scale, float* centre, float* plus,
                                 float* minus, int64_t d) {
  perturb_row_loop<float, float>(xr, raw, scale, centre, plus, minus, d);
}
template <typename scalar_t, typename acc_t>
inline void dsm_noisy_row(const scalar_t* xr, const float* z, acc_t sigma, acc_t* xt, int64_t d) {
  dsm_noisy_row_loop<scalar_t, acc_t>(xr, z, sigma, xt, d);
}
FDSM_ROW_CLONES void dsm_noisy_row(const float* xr, const float* z, float sigma, float* xt, int64_t d) {
  dsm_noisy_row_loop<float, float>(xr, z, sigma, xt, d);
}
template <typename scalar_t, typename acc_t>
inline double dsm_perturb_row(const acc_t* xt, const float* z, const float* raw, acc_t scale, scalar_t* plus,
                              scalar_t* minus, int64_t d) {
  return dsm_perturb_row_loop<scalar_t, acc_t>(xt, z, raw, scale, plus, minus, d);
}
FDSM_ROW_CLONES double dsm_perturb_row(const float* xt, const float* z, const float* raw, float scale, float* plus,
                                       float* minus, int64_t d) {
  return dsm_perturb_row_loop<float, float>(xt, z, raw, scale, plus, minus, d);
}
template <typename scalar_t, typename acc_t>
inline double vr_row(const scalar_t* pr, const scalar_t* mr, const float* raw, acc_t scale, acc_t k, int64_t d) {
  return vr_row_loop<scalar_t, acc_t>(pr, mr, raw, scale, k, d);
}
FDSM_ROW_CLONES double vr_row(const float* pr, const float* mr, const float* raw, float scale, float k, int64_t d) {
  return vr_row_loop<float, float>(pr, mr, raw, scale, k, d);
}
template <typename scalar_t, typename acc_t>
inline void vr_backward_row(const scalar_t* pr, const scalar_t* mr, const float* raw, acc_t scale, acc_t k, acc_t gi,
                            scalar_t* gpr, scalar_t* gmr, int64_t d) {
  vr_backward_row_loop<scalar_t, acc_t>(pr, mr, raw, scale, k, gi, gpr, gmr, d);
}
FDSM_ROW_CLONES void vr_backward_row(const float* pr, const float* mr, const float* raw, float scale, float k, float gi,
                                     float* gpr, float* gmr, int64_t d) {
  vr_backward_row_loop<float, float>(pr, mr, raw, scale, k, gi, gpr, gmr, d);
}
template <typename acc_t>
inline double dsm_proj_row(const float* raw, acc_t scale, const acc_t* w, int64_t d) {
  return dsm_proj_row_loop<acc_t>(raw, scale, w, d);
}
FDSM_ROW_CLONES double dsm_proj_row(const float* raw, float scale, const float* w, int64_t d) {
  return dsm_proj_row_loop<float>(raw, scale, w, d);
}

// ------------------------------------------------------------------ perturb
at::Tensor perturb_cpu(const at::Tensor& x_in, const at::Tensor& seed, double eps, int64_t n,
                       int64_t kind, bool center) {
  check_perturb(x_in, seed, eps, n, kind, center);
  const auto [s, off] = read_seed(seed);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), nb = n * B, base = center ? B : 0;
  at::Tensor out = new_output({base + 2 * nb, d}, x.options());
  if (out.numel() == 0) return out;
  FD_DISPATCH(x.scalar_type(), "perturb_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // One pass: row r reads x's row r % B; the first slice (r < B) also writes it to the centre row r,
    // so the centre needs no copy of its own.
    at::parallel_for(0, nb, grain_rows(d), [&](int64_t beg, int64_t end) {
      std::vector<float> buf(d);
      for (int64_t r = beg; r < end; ++r) {
        const acc_t scale = static_cast<acc_t>(direction_row(kind, s, off, r, d, eps, buf.data()));
        const scalar_t* xr = xp + (r % B) * d;
        scalar_t* centre = center && r < B ? op + r * d : nullptr;
        scalar_t *pr = op + (base + r) * d, *mr = op + (base + nb + r) * d;
        perturb_row(xr, buf.data(), scale, centre, pr, mr, d);
      }
    });
  });
  return out;
}

// -------------------------------------------------------------- dsm_perturb
// Per sample i: z_i is the raw gaussian stream row n*B + i (drawn once), x~_i = x_i + sigma_i z_i in acc,
// and for each slice k the rows x~_i +- v_ki (stream row k*B + i, as perturb's) with proj[k, i] =
// v_ki^T z_i / sigma_i. One draw of each row, and the noise never stored.
std::tuple<at::Tensor, at::Tensor> dsm_perturb_cpu(const at::Tensor& x_in, const at::Tensor& sigma_in,
                                                   const at::Tensor& seed, double eps, int64_t n, int64_t kind) {
  check_dsm_perturb(x_in, sigma_in, seed, eps, n, kind);
  const auto [s, off] = read_seed(seed);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), nb = n * B;
  const at::ScalarType acc_type = loss_dtype(x.scalar_type());
  const at::Tensor sigma = sigma_in.to(acc_type).contiguous();
  at::Tensor out = new_output({2 * nb, d}, x.options());
  at::Tensor proj = new_output({n, B}, x.options().dtype(acc_type));
  if (nb == 0) return {out, proj};
  if (d == 0) return {out, proj.zero_()};  // v^T z of empty rows
  FD_DISPATCH(x.scalar_type(), "dsm_perturb_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* sg = sigma.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    acc_t* pp = proj.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, grain_rows((n + 1) * d), [&](int64_t beg, int64_t end) {
      std::vector<float> z(d), raw(d);
      std::vector<acc_t> xt(d);
      for (int64_t i = beg; i < end; ++i) {
        const acc_t sigma_i = sg[i];
        raw_direction_values(kGaussian, s, off, static_cast<uint64_t>(nb + i), 0, d, z.data());
        const scalar_t* xr = xp + i * d;
        dsm_noisy_row(xr, z.data(), sigma_i, xt.data(), d);
        for (int64_t k = 0; k < n; ++k) {
          const int64_t r = k * B + i;
          const acc_t scale = static_cast<acc_t>(direction_row(kind, s, off, r, d, eps, raw.data()));
          const double dot = dsm_perturb_row(xt.data(), z.data(), raw.data(), scale, op + r * d, op + (nb + r) * d, d);
          pp[r] = static_cast<acc_t>(dot) / sigma_i;
        }
      }
    });
  });
  return {out, proj};
}

// ---------------------------------------------------------- fd_ssm_quotient

at::Tensor fd_ssm_quotient_cpu(const at::Tensor& f0_in, const at::Tensor& fp_in, const at::Tensor& fm_in,
                               double eps, double dim_scale) {
  check_fd_ssm_quotient(f0_in, fp_in, fm_in, eps, dim_scale);
  const QuotientArgs q = quotient_args(f0_in, fp_in, fm_in);
  const at::Tensor &f0 = q.f0, &fp = q.fp, &fm = q.fm;
  const int64_t n = q.n, B = q.B;
  at::Tensor out = new_loss_output(f0, B);
  FD_DISPATCH(f0.scalar_type(), "fd_ssm_quotient_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *a = f0.const_data_ptr<scalar_t>(), *p = fp.const_data_ptr<scalar_t>(),
                   *m = fm.const_data_ptr<scalar_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const acc_t c = static_cast<acc_t>(dim_scale / (eps * eps) / static_cast<double>(n));
    // Slices outer, samples inner: the inner loop is contiguous and vectorises, and each sample still
    // sums its slices in order k = 0, 1, ... (the same bits as the Triton kernel's loop).
    at::parallel_for(0, B, 4096, [&](int64_t beg, int64_t end) {
      std::fill(o + beg, o + end, acc_t(0));
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t *pk = p + k * B, *mk = m + k * B;
        for (int64_t i = beg; i < end; ++i)
          o[i] += fd_ssm_term<acc_t>(static_cast<acc_t>(a[i]), static_cast<acc_t>(pk[i]), static_cast<acc_t>(mk[i]));
      }
      for (int64_t i = beg; i < end; ++i) o[i] = c * o[i];
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_ssm_quotient_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& f0_in, const at::Tensor& fp_in, const at::Tensor& fm_in,
    double eps, double dim_scale) {
  check_fd_ssm_quotient_backward(grad_in, f0_in, fp_in, fm_in, eps, dim_scale);
  const QuotientArgs q = quotient_args(f0_in, fp_in, fm_in);
  const at::Tensor &f0 = q.f0, &fp = q.fp, &fm = q.fm;
  const int64_t n = q.n, B = q.B;
  const at::Tensor grad = loss_grad(grad_in, f0);
  at::Tensor g0 = new_output({B}, f0.options()), gp = new_output({n, B}, fp.options()),
             gm = new_output({n, B}, fm.options());
  FD_DISPATCH(f0.scalar_type(), "fd_ssm_quotient_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *p = fp.const_data_ptr<scalar_t>(), *m = fm.const_data_ptr<scalar_t>();
    const acc_t* g = grad.const_data_ptr<acc_t>();
    scalar_t *o0 = g0.mutable_data_ptr<scalar_t>(), *op = gp.mutable_data_ptr<scalar_t>(),
             *om = gm.mutable_data_ptr<scalar_t>();
    const acc_t c = static_cast<acc_t>(dim_scale / (eps * eps) / static_cast<double>(n));
    at::parallel_for(0, B, 4096, [&](int64_t beg, int64_t end) {  // samples inner: contiguous, vectorises
      for (int64_t i = beg; i < end; ++i) o0[i] = static_cast<scalar_t>(g[i] * c * acc_t(-2) * static_cast<acc_t>(n));
      for (int64_t k = 0; k < n; ++k) {
        for (int64_t i = beg; i < end; ++i) {
          const acc_t gc = g[i] * c;
          const acc_t pv = static_cast<acc_t>(p[k * B + i]), mv = static_cast<acc_t>(m[k * B + i]);
          op[k * B + i] = static_cast<scalar_t>(gc * fd_ssm_dfp<acc_t>(pv, mv));
          om[k * B + i] = static_cast<scalar_t>(gc * fd_ssm_dfm<acc_t>(pv, mv));
        }
      }
    });
  });
  return {g0, gp, gm};
}

// ---------------------------------------------------------------- fd_ssm_vr

at::Tensor fd_ssm_vr_cpu(const at::Tensor& sp_in, const at::Tensor& sm_in, const at::Tensor& seed, double eps,
                         int64_t kind, double dim_scale) {
  check_fd_ssm_vr(sp_in, sm_in, seed, eps, kind, dim_scale);
  const auto [s, off] = read_seed(seed);
  const VrArgs a = vr_args(sp_in, sm_in);
  const at::Tensor &sp = a.sp, &sm = a.sm;
  const int64_t n = a.n, B = a.B, d = a.d;
  at::Tensor out = new_loss_output(sp, B);
  FD_DISPATCH(sp.scalar_type(), "fd_ssm_vr_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *p = sp.const_data_ptr<scalar_t>(), *m = sm.const_data_ptr<scalar_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const acc_t k = static_cast<acc_t>(dim_scale / (2.0 * eps * eps));
    at::parallel_for(0, B, grain_rows(n * d), [&](int64_t beg, int64_t end) {
      std::vector<float> buf(d);
      for (int64_t i = beg; i < end; ++i) {
        double total = 0.0;
        for (int64_t sl = 0; sl < n; ++sl) {
          const int64_t r = sl * B + i;
          const acc_t scale = static_cast<acc_t>(direction_row(kind, s, off, r, d, eps, buf.data()));
          const scalar_t *pr = p + r * d, *mr = m + r * d;
          total += vr_row(pr, mr, buf.data(), scale, k, d);
        }
        o[i] = static_cast<acc_t>(total / static_cast<double>(n));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fd_ssm_vr_backward_cpu(const at::Tensor& grad_in, const at::Tensor& sp_in,
                                                         const at::Tensor& sm_in, const at::Tensor& seed,
                                                         double eps, int64_t kind, double dim_scale) {
  check_fd_ssm_vr_backward(grad_in, sp_in, sm_in, seed, eps, kind, dim_scale);
  const auto [s, off] = read_seed(seed);
  const VrArgs a = vr_args(sp_in, sm_in);
  const at::Tensor &sp = a.sp, &sm = a.sm;
  const int64_t n = a.n, B = a.B, d = a.d;
  const at::Tensor grad = loss_grad(grad_in, sp);
  at::Tensor gp = new_output(sp.sizes(), sp.options()), gm = new_output(sm.sizes(), sm.options());
  if (gp.numel() == 0) return {gp, gm};
  FD_DISPATCH(sp.scalar_type(), "fd_ssm_vr_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *p = sp.const_data_ptr<scalar_t>(), *m = sm.const_data_ptr<scalar_t>();
    const acc_t* g = grad.const_data_ptr<acc_t>();
    scalar_t *op = gp.mutable_data_ptr<scalar_t>(), *om = gm.mutable_data_ptr<scalar_t>();
    const acc_t k = static_cast<acc_t>(dim_scale / (2.0 * eps * eps));
    at::parallel_for(0, n * B, grain_rows(d), [&](int64_t beg, int64_t end) {
      std::vector<float> buf(d);
      for (int64_t r = beg; r < end; ++r) {
        const acc_t scale = static_cast<acc_t>(direction_row(kind, s, off, r, d, eps, buf.data()));
        const acc_t gi = g[r % B] / static_cast<acc_t>(n);
        const scalar_t *pr = p + r * d, *mr = m + r * d;
        scalar_t *gpr = op + r * d, *gmr = om + r * d;
        vr_backward_row(pr, mr, buf.data(), scale, k, gi, gpr, gmr, d);
      }
    });
  });
  return {gp, gm};
}

// ----------------------------------------------------------- fd_dsm_quotient

// Calls body(i, sl, residual, scale, buf) for every (sample, slice), with the
// slice's direction values in buf and v_j = buf[j] * scale.
template <typename scalar_t, typename acc_t, typename Body>
void for_each_dsm_residual(const DsmArgs& a, int64_t i, uint64_t s, uint64_t off, double eps, int64_t kind,
                           float* buf, Body body) {
  const scalar_t *p = a.fp.const_data_ptr<scalar_t>(), *m = a.fm.const_data_ptr<scalar_t>();
  const acc_t* w = a.noise.const_data_ptr<acc_t>() + i * a.d;
  const acc_t sigma = a.sigma.const_data_ptr<acc_t>()[i];
  for (int64_t sl = 0; sl < a.n; ++sl) {
    const int64_t r = sl * a.B + i;
    const acc_t scale = static_cast<acc_t>(direction_row(kind, s, off, r, a.d, eps, buf));
    const double proj = dsm_proj_row(buf, scale, w, a.d);
    const acc_t res = fd_dsm_residual<acc_t>(static_cast<acc_t>(p[r]), static_cast<acc_t>(m[r]),
                                             static_cast<acc_t>(proj), sigma);
    body(sl, res, scale, sigma);
  }
}

at::Tensor fd_dsm_quotient_cpu(const at::Tensor& fp_in, const at::Tensor& fm_in, const at::Tensor& noise_in,
                               const at::Tensor& sigma_in, const at::Tensor& seed, double eps, int64_t kind,
                               double dim_scale) {
  check_fd_dsm_quotient(fp_in, fm_in, noise_in, sigma_in, seed, eps, kind, dim_scale);
  const DsmArgs a = dsm_args(fp_in, fm_in, noise_in, sigma_in);
  const auto [s, off] = read_seed(seed);
  at::Tensor out = new_loss_output(a.fp, a.B);
  FD_DISPATCH(a.fp.scalar_type(), "fd_dsm_quotient_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const acc_t half_c = static_cast<acc_t>(0.5 * dim_scale / (eps * eps));
    at::parallel_for(0, a.B, grain_rows(a.n * a.d), [&](int64_t beg, int64_t end) {
      std::vector<float> buf(a.d);
      for (int64_t i = beg; i < end; ++i) {
        acc_t total = 0;
        for_each_dsm_residual<scalar_t, acc_t>(a, i, s, off, eps, kind, buf.data(),
                                               [&](int64_t, acc_t res, acc_t, acc_t) { total += half_c * res * res; });
        o[i] = total / static_cast<acc_t>(a.n);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fd_dsm_quotient_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& fp_in, const at::Tensor& fm_in, const at::Tensor& noise_in,
    const at::Tensor& sigma_in, const at::Tensor& seed, double eps, int64_t kind, double dim_scale) {
  check_fd_dsm_quotient_backward(grad_in, fp_in, fm_in, noise_in, sigma_in, seed, eps, kind, dim_scale);
  const DsmArgs a = dsm_args(fp_in, fm_in, noise_in, sigma_in);
  const auto [s, off] = read_seed(seed);
  const at::Tensor grad = loss_grad(grad_in, a.fp);
  at::Tensor gp = new_output(a.fp.sizes(), a.fp.options()), gm = new_output(a.fm.sizes(), a.fm.options());
  FD_DISPATCH(a.fp.scalar_type(), "fd_dsm_quotient_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* g = grad.const_data_ptr<acc_t>();
    scalar_t *op = gp.mutable_data_ptr<scalar_t>(), *om = gm.mutable_data_ptr<scalar_t>();
    const acc_t c = static_cast<acc_t>(dim_scale / (eps * eps));
    at::parallel_for(0, a.B, grain_rows(a.n * a.d), [&](int64_t beg, int64_t end) {
      std::vector<float> buf(a.d);
      for (int64_t i = beg; i < end; ++i) {
        const acc_t gi = g[i] / static_cast<acc_t>(a.n);
        for_each_dsm_residual<scalar_t, acc_t>(a, i, s, off, eps, kind, buf.data(),
                                               [&](int64_t sl, acc_t res, acc_t, acc_t) {
                                                 const acc_t dr = gi * c * res * acc_t(0.5);
                                                 op[sl * a.B + i] = static_cast<scalar_t>(dr);
                                                 om[sl * a.B + i] = static_cast<scalar_t>(-dr);
                                               });
      }
    });
  });
  return {gp, gm};
}

at::Tensor fd_dsm_noise_backward_cpu(const at::Tensor& grad_in, const at::Tensor& fp_in, const at::Tensor& fm_in,
                                     const at::Tensor& noise_in, const at::Tensor& sigma_in, const at::Tensor& seed,
                                     double eps, int64_t kind, double dim_scale) {
  check_fd_dsm_noise_backward(grad_in, fp_in, fm_in, noise_in, sigma_in, seed, eps, kind, dim_scale);
  const DsmArgs a = dsm_args(fp_in, fm_in, noise_in, sigma_in);
  const auto [s, off] = read_seed(seed);
  const at::Tensor grad = loss_grad(grad_in, a.fp);
  // Accumulated and written in the accumulation dtype, cast to noise's dtype at the end.
  at::Tensor gw = new_output(a.noise.sizes(), a.noise.options());
  if (gw.numel() == 0) return gw.to(noise_in.scalar_type());
  FD_DISPATCH(a.fp.scalar_type(), "fd_dsm_noise_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* g = grad.const_data_ptr<acc_t>();
    acc_t* o = gw.mutable_data_ptr<acc_t>();
    const acc_t c = static_cast<acc_t>(dim_scale / (eps * eps));
    at::parallel_for(0, a.B, grain_rows(a.n * a.d), [&](int64_t beg, int64_t end) {
      std::vector<float> buf(a.d);
      std::vector<double> row(a.d);
      for (int64_t i = beg; i < end; ++i) {
        std::fill(row.begin(), row.end(), 0.0);
        const acc_t gi = g[i] / static_cast<acc_t>(a.n);
        for_each_dsm_residual<scalar_t, acc_t>(
            a, i, s, off, eps, kind, buf.data(), [&](int64_t, acc_t res, acc_t scale, acc_t sigma) {
              const acc_t coef = gi * c * res / (sigma * sigma);
              for (int64_t j = 0; j < a.d; ++j)
                row[j] += static_cast<double>(coef * (static_cast<acc_t>(buf[j]) * scale));
            });
        for (int64_t j = 0; j < a.d; ++j) o[i * a.d + j] = static_cast<acc_t>(row[j]);
      }
    });
  });
  gw = gw.to(noise_in.scalar_type());
  return gw;
}

// ------------------------------------------------------------------ stencil

at::Tensor stencil_perturb_cpu(const at::Tensor& x_in, const at::Tensor& v_in, double eps, int64_t order) {
  check_stencil_perturb(x_in, v_in, eps, order);
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), T1 = order + 1;
  at::Tensor out = new_output({T1 * B, d}, x.options());
  if (out.numel() == 0) return out;
  FD_DISPATCH(x.scalar_type(), "stencil_perturb_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *vp = v.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T1 * B, grain_rows(d), [&](int64_t beg, int64_t end) {
      for (int64_t r = beg; r < end; ++r) {
        const acc_t shift = static_cast<acc_t>(stencil_shift(order, r / B, eps));
        const int64_t i = r % B;
        for (int64_t j = 0; j < d; ++j)
          o[r * d + j] = static_cast<scalar_t>(static_cast<acc_t>(xp[i * d + j]) +
                                               shift * static_cast<acc_t>(vp[i * d + j]));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> stencil_perturb_backward_cpu(const at::Tensor& grad_in, double eps,
                                                                int64_t order) {
  check_stencil_perturb_backward(grad_in, eps, order);
  const at::Tensor grad = grad_in.contiguous();
  const int64_t T1 = order + 1, B = grad.size(0) / T1, d = grad.size(1);
  at::Tensor gx = new_output({B, d}, grad.options()), gv = new_output({B, d}, grad.options());
  if (gx.numel() == 0) return {gx, gv};
  FD_DISPATCH(grad.scalar_type(), "stencil_perturb_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t *ox = gx.mutable_data_ptr<scalar_t>(), *ov = gv.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(T1 * d), [&](int64_t beg, int64_t end) {
      for (int64_t i = beg; i < end; ++i) {
        for (int64_t j = 0; j < d; ++j) {
          acc_t sx = 0, sv = 0;
          for (int64_t t = 0; t < T1; ++t) {
            const acc_t gt = static_cast<acc_t>(g[(t * B + i) * d + j]);
            sx += gt;
            sv += static_cast<acc_t>(stencil_shift(order, t, eps)) * gt;
          }
          ox[i * d + j] = static_cast<scalar_t>(sx);
          ov[i * d + j] = static_cast<scalar_t>(sv);
        }
      }
    });
  });
  return {gx, gv};
}


at::Tensor stencil_combine_cpu(const at::Tensor& f_in, double eps, int64_t order) {
  check_stencil_combine(f_in, eps, order);
  const at::Tensor f = f_in.contiguous();
  const int64_t B = f.size(1);
  at::Tensor out = new_loss_output(f, B);
  FD_DISPATCH(f.scalar_type(), "stencil_combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    std::vector<double> w(order + 1);  // the weights once, not per element
    for (int64_t t = 0; t <= order; ++t) w[t] = stencil_weight(order, t, eps);
    // kBlock samples at a time, their sums in registers (the compiler vectorises across samples); each
    // sample still sums t = 0, 1, ... in order.
    constexpr int kBlock = 8;
    const auto term = [&](int64_t t, int64_t i) {
      return w[t] * static_cast<double>(static_cast<acc_t>(fp[t * B + i]));
    };
    at::parallel_for(0, B, 4096, [&](int64_t beg, int64_t end) {
      int64_t i = beg;
      for (; i + kBlock <= end; i += kBlock) {
        double total[kBlock] = {};
        for (int64_t t = 0; t <= order; ++t)
          for (int l = 0; l < kBlock; ++l) total[l] += term(t, i + l);
        for (int l = 0; l < kBlock; ++l) o[i + l] = static_cast<acc_t>(total[l]);
      }
      for (; i < end; ++i) {
        double total = 0.0;
        for (int64_t t = 0; t <= order; ++t) total += term(t, i);
        o[i] = static_cast<acc_t>(total);
      }
    });
  });
  return out;
}

at::Tensor stencil_combine_backward_cpu(const at::Tensor& grad_in, const at::Tensor& f, double eps, int64_t order) {
  check_stencil_combine_backward(grad_in, f, eps, order);
  const int64_t B = f.size(1);
  const at::Tensor grad = grad_in.to(at::kDouble).contiguous();
  at::Tensor out = new_output(f.sizes(), f.options());
  FD_DISPATCH(f.scalar_type(), "stencil_combine_backward_cpu", [&] {
    const double* g = grad.const_data_ptr<double>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t <= order; ++t) {
      const double w = stencil_weight(order, t, eps);
      for (int64_t i = 0; i < B; ++i) o[t * B + i] = static_cast<scalar_t>(w * g[i]);
    }
  });
  return out;
}

// ------------------------------------------------------------ fd_divergence

at::Tensor fd_divergence_cpu(const at::Tensor& sp_in, const at::Tensor& sm_in, const at::Tensor& seed, double eps,
                             int64_t kind) {
  check_fd_divergence(sp_in, sm_in, seed, eps, kind);
  const auto [s, off] = read_seed(seed);
  const VrArgs a = vr_args(sp_in, sm_in);
  const at::Tensor &sp = a.sp, &sm = a.sm;
  const int64_t n = a.n, B = a.B, d = a.d;
  at::Tensor out = new_output({n, B}, sp.options().dtype(loss_dtype(sp.scalar_type())));
  if (out.numel() == 0) return out;
  FD_DISPATCH(sp.scalar_type(), "fd_divergence_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *p = sp.const_data_ptr<scalar_t>(), *m = sm.const_data_ptr<scalar_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    const double c = fd_divergence_scale(eps, d);
    at::parallel_for(0, n * B, grain_rows(d), [&](int64_t beg, int64_t end) {
      std::vector<float> buf(d);
      for (int64_t r = beg; r < end; ++r) {  // direction row r = slice * B + sample: out's element r
        const acc_t scale = static_cast<acc_t>(direction_row(kind, s, off, r, d, eps, buf.data()));
        const scalar_t *pr = p + r * d, *mr = m + r * d;
        double total = 0.0;
        for (int64_t j = 0; j < d; ++j)
          total += static_cast<double>(fd_divergence_elem<acc_t>(static_cast<acc_t>(pr[j]), static_cast<acc_t>(mr[j]),
                                                                 static_cast<acc_t>(buf[j]) * scale));
        o[r] = static_cast<acc_t>(c * total);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fd_divergence_backward_cpu(const at::Tensor& grad_in, const at::Tensor& sp_in,
                                                             const at::Tensor& sm_in, const at::Tensor& seed,
                                                             double eps, int64_t kind) {
  check_fd_divergence_backward(grad_in, sp_in, sm_in, seed, eps, kind);
  const auto [s, off] = read_seed(seed);
  const int64_t n = sp_in.size(0), B = sp_in.size(1), d = sp_in.size(2);
  const at::Tensor grad = loss_grad(grad_in, sp_in);  // (n, B), contiguous
  // The gradient does not depend on sp and sm (div is linear in them): only their shape and dtype are used.
  at::Tensor gp = new_output(sp_in.sizes(), sp_in.options()), gm = new_output(sm_in.sizes(), sm_in.options());
  if (gp.numel() == 0) return {gp, gm};
  FD_DISPATCH(sp_in.scalar_type(), "fd_divergence_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* g = grad.const_data_ptr<acc_t>();
    scalar_t *op = gp.mutable_data_ptr<scalar_t>(), *om = gm.mutable_data_ptr<scalar_t>();
    const double c = fd_divergence_scale(eps, d);
    at::parallel_for(0, n * B, grain_rows(d), [&](int64_t beg, int64_t end) {
      std::vector<float> buf(d);
      for (int64_t r = beg; r < end; ++r) {
        const acc_t scale = static_cast<acc_t>(direction_row(kind, s, off, r, d, eps, buf.data()));
        const acc_t gc = static_cast<acc_t>(static_cast<double>(g[r]) * c);
        scalar_t *gpr = op + r * d, *gmr = om + r * d;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t dp = fd_divergence_dsp<acc_t>(gc, static_cast<acc_t>(buf[j]) * scale);
          gpr[j] = static_cast<scalar_t>(dp);
          gmr[j] = static_cast<scalar_t>(-dp);
        }
      }
    });
  });
  return {gp, gm};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm_ext, CPU, m) {
  m.impl("perturb", &perturb_cpu);
  m.impl("dsm_perturb", &dsm_perturb_cpu);
  m.impl("fd_ssm_quotient", &fd_ssm_quotient_cpu);
  m.impl("fd_ssm_quotient_backward", &fd_ssm_quotient_backward_cpu);
  m.impl("fd_ssm_vr", &fd_ssm_vr_cpu);
  m.impl("fd_ssm_vr_backward", &fd_ssm_vr_backward_cpu);
  m.impl("fd_dsm_quotient", &fd_dsm_quotient_cpu);
  m.impl("fd_dsm_quotient_backward", &fd_dsm_quotient_backward_cpu);
  m.impl("fd_dsm_noise_backward", &fd_dsm_noise_backward_cpu);
  m.impl("stencil_perturb", &stencil_perturb_cpu);
  m.impl("stencil_perturb_backward", &stencil_perturb_backward_cpu);
  m.impl("stencil_combine", &stencil_combine_cpu);
  m.impl("stencil_combine_backward", &stencil_combine_backward_cpu);
  m.impl("fd_divergence", &fd_divergence_cpu);
  m.impl("fd_divergence_backward", &fd_divergence_backward_cpu);
}

}  // namespace fdsm
