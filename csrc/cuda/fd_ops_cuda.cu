// CUDA kernels of every fdsm_ext op. The formulas and the Philox direction stream come from
// fd_math.h, shared with the CPU kernels: v is regenerated in-kernel from (seed, offset) in both the
// forward and the backward, never stored.
//
// Layout: per-row work (a direction row, or a sample's slices) is done by a "row group" of G threads:
// a warp (G = 32, several rows per block) for rows of up to 512 features, the whole block (G = 256)
// for longer rows. Row sums are tree-reduced inside the group; grids are grid-stride loops with
// 64-bit indices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../fd_common.h"
#include "../fd_math.h"
#include "cuda_rows.cuh"

namespace fdsm {
namespace {

using namespace cuda;

// ------------------------------------------------------------------ perturb
template <typename scalar_t, int G>
__global__ void perturb_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t B, int64_t d,
                               int64_t nb, int64_t base, double eps, int64_t kind, uint64_t seed, uint64_t off,
                               bool vec4) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (d + 3) / 4;
  for (int64_t r = RowGroup<G>::first(); r < nb; r += RowGroup<G>::stride()) {
    const acc_t scale = static_cast<acc_t>(row_scale(kind, eps, d, row_sum_sq<G>(kind, seed, off, r, d)));
    const scalar_t* xr = x + (r % B) * d;
    scalar_t* pr = out + (base + r) * d;
    scalar_t* mr = out + (base + nb + r) * d;
    for (int64_t g = RowGroup<G>::lane(); g < groups; g += G) {
      const F32x4 z = raw_direction4(kind, seed, off, r, g);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (vec4) {  // 128-bit loads and stores: d % 4 == 0 and 16-byte aligned rows
          const float4 xv = reinterpret_cast<const float4*>(xr)[g];
          const float v0 = z.v[0] * scale, v1 = z.v[1] * scale, v2 = z.v[2] * scale, v3 = z.v[3] * scale;
          reinterpret_cast<float4*>(pr)[g] = make_float4(xv.x + v0, xv.y + v1, xv.z + v2, xv.w + v3);
          reinterpret_cast<float4*>(mr)[g] = make_float4(xv.x - v0, xv.y - v1, xv.z - v2, xv.w - v3);
          continue;
        }
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t j = g * 4 + l;
        if (j < d) {
          const acc_t v = static_cast<acc_t>(z.v[l]) * scale;
          const acc_t xv = static_cast<acc_t>(xr[j]);
          pr[j] = static_cast<scalar_t>(xv + v);
          mr[j] = static_cast<scalar_t>(xv - v);
        }
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

at::Tensor perturb_cuda(const at::Tensor& x_in, const at::Tensor& seed, double eps, int64_t n, int64_t kind,
                        bool center) {
  check_perturb(x_in, seed, eps, n, kind, center);
  const auto [s, off] = read_seed(seed);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), nb = n * B, base = center ? B : 0;
  at::Tensor out = new_output({base + 2 * nb, d}, x.options());
  if (out.numel() == 0) return out;
  if (center) out.narrow(0, 0, B).copy_(x);
  FD_DISPATCH(x.scalar_type(), "perturb_cuda", [&] {
    const bool vec4 = d % 4 == 0 && aligned16(x.const_data_ptr()) && aligned16(out.const_data_ptr());
    with_row_group(d, [&](auto g) {
      constexpr int G = decltype(g)::value;
      perturb_kernel<scalar_t, G><<<row_blocks(nb, G), kThreads, 0, stream()>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B, d, nb, base, eps, kind, s, off, vec4);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// -------------------------------------------------------------- dsm_perturb
// One row group per direction row r = k * B + i, as perturb_kernel: it writes x~ +- v_r (rows r and
// nb + r) with x~ = x_i + sigma_i z_i, and proj[r] = v_r^T z_i / sigma_i, the row's products summed in
// double (as the CPU kernel) and tree-reduced in the group. z_i (the raw gaussian stream row nb + i) is
// regenerated for each of the n slices rather than drawn once per sample as on the CPU: a group per
// direction row keeps perturb's n B-way parallelism and one reduction per proj element, and the kernel
// is bound by its 2 n B d stores, not by Philox. Same values, so the stacked batch is the CPU's bits.
template <typename scalar_t, int G>
__global__ void dsm_perturb_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ sigma,
                                   scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ proj, int64_t B,
                                   int64_t d, int64_t nb, double eps, int64_t kind, uint64_t seed, uint64_t off,
                                   bool vec4) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (d + 3) / 4;
  for (int64_t r = RowGroup<G>::first(); r < nb; r += RowGroup<G>::stride()) {
    const int64_t i = r % B;
    const acc_t scale = static_cast<acc_t>(row_scale(kind, eps, d, row_sum_sq<G>(kind, seed, off, r, d)));
    const acc_t sig = sigma[i];
    const scalar_t* xr = x + i * d;
    scalar_t* pr = out + r * d;
    scalar_t* mr = out + (nb + r) * d;
    double total = 0.0;  // v^T z in double, as the CPU kernel
    for (int64_t g = RowGroup<G>::lane(); g < groups; g += G) {
      const F32x4 z = raw_direction4(kGaussian, seed, off, nb + i, g);
      const F32x4 u = raw_direction4(kind, seed, off, r, g);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (vec4) {  // 128-bit loads and stores: d % 4 == 0 and 16-byte aligned rows
          const float4 xv = reinterpret_cast<const float4*>(xr)[g];
          const float xs[4] = {xv.x, xv.y, xv.z, xv.w};
          float p[4], m[4];
#pragma unroll
          for (int l = 0; l < 4; ++l) {
            const float v = u.v[l] * scale;
            const float xt = xs[l] + sig * z.v[l];
            p[l] = xt + v;
            m[l] = xt - v;
            total += static_cast<double>(v * z.v[l]);
          }
          reinterpret_cast<float4*>(pr)[g] = make_float4(p[0], p[1], p[2], p[3]);
          reinterpret_cast<float4*>(mr)[g] = make_float4(m[0], m[1], m[2], m[3]);
          continue;
        }
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t j = g * 4 + l;
        if (j < d) {
          const acc_t zl = static_cast<acc_t>(z.v[l]);
          const acc_t v = static_cast<acc_t>(u.v[l]) * scale;
          const acc_t xt = static_cast<acc_t>(xr[j]) + sig * zl;
          pr[j] = static_cast<scalar_t>(xt + v);
          mr[j] = static_cast<scalar_t>(xt - v);
          total += static_cast<double>(v * zl);
        }
      }
    }
    total = group_sum<G>(total);
    if (RowGroup<G>::lane() == 0) proj[r] = static_cast<acc_t>(total) / sig;
  }
}

std::tuple<at::Tensor, at::Tensor> dsm_perturb_cuda(const at::Tensor& x_in, const at::Tensor& sigma_in,
                                                    const at::Tensor& seed, double eps, int64_t n, int64_t kind) {
  check_dsm_perturb(x_in, sigma_in, seed, eps, n, kind);
  const auto [s, off] = read_seed(seed);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), nb = n * B;
  const at::ScalarType acc_type = loss_dtype(x.scalar_type());
  at::Tensor out = new_output({2 * nb, d}, x.options());
  at::Tensor proj = new_output({n, B}, x.options().dtype(acc_type));
  if (nb == 0) return {out, proj};
  if (d == 0) return {out, proj.zero_()};  // v^T z of empty rows (0, not 0 / sigma: sigma may be 0)
  const at::Tensor sigma = sigma_in.to(acc_type).contiguous();
  FD_DISPATCH(x.scalar_type(), "dsm_perturb_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool vec4 = d % 4 == 0 && aligned16(x.const_data_ptr()) && aligned16(out.const_data_ptr());
    with_row_group(d, [&](auto g) {
      constexpr int G = decltype(g)::value;
      dsm_perturb_kernel<scalar_t, G><<<row_blocks(nb, G), kThreads, 0, stream()>>>(
          x.const_data_ptr<scalar_t>(), sigma.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
          proj.mutable_data_ptr<acc_t>(), B, d, nb, eps, kind, s, off, vec4);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, proj};
}

// ---------------------------------------------------------- fd_ssm_quotient
template <typename scalar_t>
__global__ void quotient_kernel(const scalar_t* __restrict__ f0, const scalar_t* __restrict__ fp,
                                const scalar_t* __restrict__ fm, at::opmath_type<scalar_t>* __restrict__ out,
                                int64_t n, int64_t B, at::opmath_type<scalar_t> c) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t a = static_cast<acc_t>(f0[i]);
    acc_t total = 0;
    for (int64_t k = 0; k < n; ++k)
      total += fd_ssm_term<acc_t>(a, static_cast<acc_t>(fp[k * B + i]), static_cast<acc_t>(fm[k * B + i]));
    out[i] = c * total;
  }
}

template <typename scalar_t>
__global__ void quotient_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad,
                                         const scalar_t* __restrict__ fp, const scalar_t* __restrict__ fm,
                                         scalar_t* __restrict__ g0, scalar_t* __restrict__ gp,
                                         scalar_t* __restrict__ gm, int64_t n, int64_t B,
                                         at::opmath_type<scalar_t> c) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t gc = grad[i] * c;
    g0[i] = static_cast<scalar_t>(gc * acc_t(-2) * static_cast<acc_t>(n));
    for (int64_t k = 0; k < n; ++k) {
      const acc_t p = static_cast<acc_t>(fp[k * B + i]), m = static_cast<acc_t>(fm[k * B + i]);
      gp[k * B + i] = static_cast<scalar_t>(gc * fd_ssm_dfp<acc_t>(p, m));
      gm[k * B + i] = static_cast<scalar_t>(gc * fd_ssm_dfm<acc_t>(p, m));
    }
  }
}


at::Tensor fd_ssm_quotient_cuda(const at::Tensor& f0_in, const at::Tensor& fp_in, const at::Tensor& fm_in,
                                double eps, double dim_scale) {
  check_fd_ssm_quotient(f0_in, fp_in, fm_in, eps, dim_scale);
  c10::cuda::CUDAGuard guard(f0_in.device());
  const QuotientArgs q = quotient_args(f0_in, fp_in, fm_in);
  const at::Tensor &f0 = q.f0, &fp = q.fp, &fm = q.fm;
  const int64_t n = q.n, B = q.B;
  at::Tensor out = new_loss_output(f0, B);
  if (B == 0) return out;
  FD_DISPATCH(f0.scalar_type(), "fd_ssm_quotient_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    quotient_kernel<scalar_t><<<elem_blocks(B), kThreads, 0, stream()>>>(
        f0.const_data_ptr<scalar_t>(), fp.const_data_ptr<scalar_t>(), fm.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<acc_t>(), n, B, static_cast<acc_t>(dim_scale / (eps * eps) / static_cast<double>(n)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_ssm_quotient_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& f0_in, const at::Tensor& fp_in, const at::Tensor& fm_in,
    double eps, double dim_scale) {
  check_fd_ssm_quotient_backward(grad_in, f0_in, fp_in, fm_in, eps, dim_scale);
  c10::cuda::CUDAGuard guard(f0_in.device());
  const QuotientArgs q = quotient_args(f0_in, fp_in, fm_in);
  const at::Tensor &f0 = q.f0, &fp = q.fp, &fm = q.fm;
  const int64_t n = q.n, B = q.B;
  const at::Tensor grad = loss_grad(grad_in, f0);
  at::Tensor g0 = new_output({B}, f0.options()), gp = new_output({n, B}, fp.options()),
             gm = new_output({n, B}, fm.options());
  if (B == 0) return {g0, gp, gm};
  FD_DISPATCH(f0.scalar_type(), "fd_ssm_quotient_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    quotient_backward_kernel<scalar_t><<<elem_blocks(B), kThreads, 0, stream()>>>(
        grad.const_data_ptr<acc_t>(), fp.const_data_ptr<scalar_t>(), fm.const_data_ptr<scalar_t>(),
        g0.mutable_data_ptr<scalar_t>(), gp.mutable_data_ptr<scalar_t>(), gm.mutable_data_ptr<scalar_t>(), n, B,
        static_cast<acc_t>(dim_scale / (eps * eps) / static_cast<double>(n)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g0, gp, gm};
}

// ---------------------------------------------------------------- fd_ssm_vr
template <typename scalar_t, int G>
__global__ void vr_kernel(const scalar_t* __restrict__ sp, const scalar_t* __restrict__ sm,
                          at::opmath_type<scalar_t>* __restrict__ out, int64_t n, int64_t B, int64_t d, double eps,
                          int64_t kind, uint64_t seed, uint64_t off, at::opmath_type<scalar_t> k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (d + 3) / 4;
  for (int64_t i = RowGroup<G>::first(); i < B; i += RowGroup<G>::stride()) {
    double total = 0.0;  // in double, as the CPU kernel
    for (int64_t sl = 0; sl < n; ++sl) {
      const int64_t r = sl * B + i;
      const acc_t scale = static_cast<acc_t>(row_scale(kind, eps, d, row_sum_sq<G>(kind, seed, off, r, d)));
      const scalar_t *pr = sp + r * d, *mr = sm + r * d;
      for (int64_t g = RowGroup<G>::lane(); g < groups; g += G) {
        const F32x4 z = raw_direction4(kind, seed, off, r, g);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          const int64_t j = g * 4 + l;
          if (j < d)
            total += static_cast<double>(fd_ssm_vr_elem<acc_t>(static_cast<acc_t>(pr[j]), static_cast<acc_t>(mr[j]),
                                                               static_cast<acc_t>(z.v[l]) * scale, k));
        }
      }
    }
    total = group_sum<G>(total);
    if (RowGroup<G>::lane() == 0) out[i] = static_cast<acc_t>(total / static_cast<double>(n));
  }
}

template <typename scalar_t, int G>
__global__ void vr_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad,
                                   const scalar_t* __restrict__ sp, const scalar_t* __restrict__ sm,
                                   scalar_t* __restrict__ gp, scalar_t* __restrict__ gm, int64_t n, int64_t B,
                                   int64_t d, double eps, int64_t kind, uint64_t seed, uint64_t off,
                                   at::opmath_type<scalar_t> k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (d + 3) / 4;
  for (int64_t r = RowGroup<G>::first(); r < n * B; r += RowGroup<G>::stride()) {
    const acc_t scale = static_cast<acc_t>(row_scale(kind, eps, d, row_sum_sq<G>(kind, seed, off, r, d)));
    const acc_t gi = grad[r % B] / static_cast<acc_t>(n);
    for (int64_t g = RowGroup<G>::lane(); g < groups; g += G) {
      const F32x4 z = raw_direction4(kind, seed, off, r, g);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t j = r * d + g * 4 + l;
        if (g * 4 + l < d) {
          const acc_t p = static_cast<acc_t>(sp[j]), m = static_cast<acc_t>(sm[j]);
          const acc_t v = static_cast<acc_t>(z.v[l]) * scale;
          gp[j] = static_cast<scalar_t>(gi * fd_ssm_vr_dsp<acc_t>(p, m, v, k));
          gm[j] = static_cast<scalar_t>(gi * fd_ssm_vr_dsm<acc_t>(p, m, v, k));
        }
      }
    }
  }
}


at::Tensor fd_ssm_vr_cuda(const at::Tensor& sp_in, const at::Tensor& sm_in, const at::Tensor& seed, double eps,
                          int64_t kind, double dim_scale) {
  check_fd_ssm_vr(sp_in, sm_in, seed, eps, kind, dim_scale);
  const auto [s, off] = read_seed(seed);
  c10::cuda::CUDAGuard guard(sp_in.device());
  const VrArgs a = vr_args(sp_in, sm_in);
  const at::Tensor &sp = a.sp, &sm = a.sm;
  const int64_t n = a.n, B = a.B, d = a.d;
  at::Tensor out = new_loss_output(sp, B);
  if (B == 0) return out;
  FD_DISPATCH(sp.scalar_type(), "fd_ssm_vr_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_row_group(d, [&](auto g) {
      constexpr int G = decltype(g)::value;
      vr_kernel<scalar_t, G><<<row_blocks(B, G), kThreads, 0, stream()>>>(
          sp.const_data_ptr<scalar_t>(), sm.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), n, B, d, eps,
          kind, s, off, static_cast<acc_t>(dim_scale / (2.0 * eps * eps)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fd_ssm_vr_backward_cuda(const at::Tensor& grad_in, const at::Tensor& sp_in,
                                                          const at::Tensor& sm_in, const at::Tensor& seed,
                                                          double eps, int64_t kind, double dim_scale) {
  check_fd_ssm_vr_backward(grad_in, sp_in, sm_in, seed, eps, kind, dim_scale);
  const auto [s, off] = read_seed(seed);
  c10::cuda::CUDAGuard guard(sp_in.device());
  const VrArgs a = vr_args(sp_in, sm_in);
  const at::Tensor &sp = a.sp, &sm = a.sm;
  const int64_t n = a.n, B = a.B, d = a.d;
  const at::Tensor grad = loss_grad(grad_in, sp);
  at::Tensor gp = new_output(sp.sizes(), sp.options()), gm = new_output(sm.sizes(), sm.options());
  if (gp.numel() == 0) return {gp, gm};
  FD_DISPATCH(sp.scalar_type(), "fd_ssm_vr_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_row_group(d, [&](auto g) {
      constexpr int G = decltype(g)::value;
      vr_backward_kernel<scalar_t, G><<<row_blocks(n * B, G), kThreads, 0, stream()>>>(
          grad.const_data_ptr<acc_t>(), sp.const_data_ptr<scalar_t>(), sm.const_data_ptr<scalar_t>(),
          gp.mutable_data_ptr<scalar_t>(), gm.mutable_data_ptr<scalar_t>(), n, B, d, eps, kind, s, off,
          static_cast<acc_t>(dim_scale / (2.0 * eps * eps)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gp, gm};
}

// ----------------------------------------------------------- fd_dsm_quotient
// What one FD-DSM row pass writes: the loss, the f+- gradients, or, per (slice, sample), the noise
// gradient's coefficient g_i/n c r / sigma^2 and the direction's scale, which dsm_noise_kernel then
// combines with the directions in one pass over the slices. Fields a pass does not write are null.
template <typename scalar_t>
struct DsmOutputs {
  at::opmath_type<scalar_t>* loss;   // (B,)
  scalar_t* gp;                      // (n, B)
  scalar_t* gm;                      // (n, B)
  at::opmath_type<scalar_t>* coef;   // (n, B)
  at::opmath_type<scalar_t>* scale;  // (n, B)
};

enum class DsmOut { kLoss, kFGrad, kNoiseCoef };

template <typename scalar_t, int G, DsmOut kOut>
__global__ void dsm_kernel(const scalar_t* __restrict__ fp, const scalar_t* __restrict__ fm,
                           const at::opmath_type<scalar_t>* __restrict__ noise,
                           const at::opmath_type<scalar_t>* __restrict__ sigma,
                           const at::opmath_type<scalar_t>* __restrict__ grad, DsmOutputs<scalar_t> out, int64_t n,
                           int64_t B, int64_t d, double eps, int64_t kind, uint64_t seed, uint64_t off,
                           at::opmath_type<scalar_t> c) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (d + 3) / 4;
  for (int64_t i = RowGroup<G>::first(); i < B; i += RowGroup<G>::stride()) {
    const acc_t* w = noise + i * d;
    const acc_t sig = sigma[i];
    const acc_t gi = kOut == DsmOut::kLoss ? acc_t(0) : grad[i] / static_cast<acc_t>(n);
    acc_t total = 0;
    for (int64_t sl = 0; sl < n; ++sl) {
      const int64_t r = sl * B + i;
      const acc_t scale = static_cast<acc_t>(row_scale(kind, eps, d, row_sum_sq<G>(kind, seed, off, r, d)));
      double proj = 0.0;  // in double, as the CPU kernel
      for (int64_t g = RowGroup<G>::lane(); g < groups; g += G) {
        const F32x4 z = raw_direction4(kind, seed, off, r, g);
#pragma unroll
        for (int l = 0; l < 4; ++l)
          if (g * 4 + l < d) proj += static_cast<double>((static_cast<acc_t>(z.v[l]) * scale) * w[g * 4 + l]);
      }
      proj = group_sum<G>(proj);
      const acc_t res = fd_dsm_residual<acc_t>(static_cast<acc_t>(fp[r]), static_cast<acc_t>(fm[r]),
                                               static_cast<acc_t>(proj), sig);
      if constexpr (kOut == DsmOut::kLoss) {
        total += acc_t(0.5) * c * res * res;
      } else if constexpr (kOut == DsmOut::kFGrad) {
        if (RowGroup<G>::lane() == 0) {
          const acc_t dr = gi * c * res * acc_t(0.5);
          out.gp[r] = static_cast<scalar_t>(dr);
          out.gm[r] = static_cast<scalar_t>(-dr);
        }
      } else {
        if (RowGroup<G>::lane() == 0) {
          out.coef[r] = gi * c * res / (sig * sig);
          out.scale[r] = scale;
        }
      }
    }
    if constexpr (kOut == DsmOut::kLoss) {
      if (RowGroup<G>::lane() == 0) out.loss[i] = total / static_cast<acc_t>(n);
    }
  }
}

// d loss / d noise_i = sum_k coef_ki v_ki: each thread owns 4 elements of a sample and sums over the
// slices in double (as the CPU kernel), writing each element once.
template <typename acc_t, int G>
__global__ void dsm_noise_kernel(const acc_t* __restrict__ coef, const acc_t* __restrict__ scale,
                                 acc_t* __restrict__ gw, int64_t n, int64_t B, int64_t d, int64_t kind,
                                 uint64_t seed, uint64_t off) {
  const int64_t groups = (d + 3) / 4;
  for (int64_t i = RowGroup<G>::first(); i < B; i += RowGroup<G>::stride()) {
    for (int64_t g = RowGroup<G>::lane(); g < groups; g += G) {
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t sl = 0; sl < n; ++sl) {
        const int64_t r = sl * B + i;
        const acc_t k = coef[r], sc = scale[r];
        const F32x4 z = raw_direction4(kind, seed, off, r, g);
#pragma unroll
        for (int l = 0; l < 4; ++l) acc[l] += static_cast<double>(k * (static_cast<acc_t>(z.v[l]) * sc));
      }
#pragma unroll
      for (int l = 0; l < 4; ++l)
        if (g * 4 + l < d) gw[i * d + g * 4 + l] = static_cast<acc_t>(acc[l]);
    }
  }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// One FD-DSM row pass; outputs not written by kOut are undefined tensors.
template <DsmOut kOut>
void launch_dsm(const DsmArgs& a, const at::Tensor& grad, const at::Tensor& loss, const at::Tensor& gp,
                const at::Tensor& gm, const at::Tensor& coef, const at::Tensor& scale, const at::Tensor& seed,
                double eps, int64_t kind, double dim_scale) {
  const auto [s, off] = read_seed(seed);
  FD_DISPATCH(a.fp.scalar_type(), "fd_dsm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DsmOutputs<scalar_t> out{ptr_or_null<acc_t>(loss), ptr_or_null<scalar_t>(gp), ptr_or_null<scalar_t>(gm),
                                   ptr_or_null<acc_t>(coef), ptr_or_null<acc_t>(scale)};
    with_row_group(a.d, [&](auto g) {
      constexpr int G = decltype(g)::value;
      dsm_kernel<scalar_t, G, kOut><<<row_blocks(a.B, G), kThreads, 0, stream()>>>(
          a.fp.const_data_ptr<scalar_t>(), a.fm.const_data_ptr<scalar_t>(), a.noise.const_data_ptr<acc_t>(),
          a.sigma.const_data_ptr<acc_t>(), grad.defined() ? grad.const_data_ptr<acc_t>() : nullptr, out, a.n, a.B,
          a.d, eps, kind, s, off, static_cast<acc_t>(dim_scale / (eps * eps)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor fd_dsm_quotient_cuda(const at::Tensor& fp, const at::Tensor& fm, const at::Tensor& noise,
                                const at::Tensor& sigma, const at::Tensor& seed, double eps, int64_t kind,
                                double dim_scale) {
  check_fd_dsm_quotient(fp, fm, noise, sigma, seed, eps, kind, dim_scale);
  c10::cuda::CUDAGuard guard(fp.device());
  const DsmArgs a = dsm_args(fp, fm, noise, sigma);
  at::Tensor out = new_loss_output(a.fp, a.B);
  const at::Tensor none;
  if (a.B > 0) launch_dsm<DsmOut::kLoss>(a, none, out, none, none, none, none, seed, eps, kind, dim_scale);
  return out;
}

std::tuple<at::Tensor, at::Tensor> fd_dsm_quotient_backward_cuda(const at::Tensor& grad_in, const at::Tensor& fp,
                                                                 const at::Tensor& fm, const at::Tensor& noise,
                                                                 const at::Tensor& sigma, const at::Tensor& seed,
                                                                 double eps, int64_t kind, double dim_scale) {
  check_fd_dsm_quotient_backward(grad_in, fp, fm, noise, sigma, seed, eps, kind, dim_scale);
  c10::cuda::CUDAGuard guard(fp.device());
  const DsmArgs a = dsm_args(fp, fm, noise, sigma);
  const at::Tensor grad = loss_grad(grad_in, a.fp);
  at::Tensor gp = new_output(a.fp.sizes(), a.fp.options()), gm = new_output(a.fm.sizes(), a.fm.options());
  const at::Tensor none;
  if (a.B > 0) launch_dsm<DsmOut::kFGrad>(a, grad, none, gp, gm, none, none, seed, eps, kind, dim_scale);
  return {gp, gm};
}

at::Tensor fd_dsm_noise_backward_cuda(const at::Tensor& grad_in, const at::Tensor& fp, const at::Tensor& fm,
                                      const at::Tensor& noise, const at::Tensor& sigma, const at::Tensor& seed,
                                      double eps, int64_t kind, double dim_scale) {
  check_fd_dsm_noise_backward(grad_in, fp, fm, noise, sigma, seed, eps, kind, dim_scale);
  c10::cuda::CUDAGuard guard(fp.device());
  const DsmArgs a = dsm_args(fp, fm, noise, sigma);
  const at::Tensor grad = loss_grad(grad_in, a.fp);
  at::Tensor gw = new_output(a.noise.sizes(), a.noise.options());
  if (gw.numel() == 0) return gw.to(noise.scalar_type());
  at::Tensor coef = at::empty({a.n, a.B}, a.noise.options()), scale = at::empty({a.n, a.B}, a.noise.options());
  const at::Tensor none;
  launch_dsm<DsmOut::kNoiseCoef>(a, grad, none, none, none, coef, scale, seed, eps, kind, dim_scale);
  const auto [s, off] = read_seed(seed);
  FD_DISPATCH(a.fp.scalar_type(), "fd_dsm_noise_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_row_group(a.d, [&](auto g) {
      constexpr int G = decltype(g)::value;
      dsm_noise_kernel<acc_t, G><<<row_blocks(a.B, G), kThreads, 0, stream()>>>(
          coef.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), gw.mutable_data_ptr<acc_t>(), a.n, a.B, a.d,
          kind, s, off);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return gw.to(noise.scalar_type());
}

// ------------------------------------------------------------------ stencil

// The stencil's shifts and weights, computed once per thread (order <= 16), not per element.
constexpr int kMaxStencil = 17;

// One thread per source element e = i * d + j: x and v read once, the T+1 shifted copies written to
// rows t * B + i, i.e. at t * B * d + e (no per-element division).
template <typename scalar_t>
__global__ void stencil_perturb_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
                                       scalar_t* __restrict__ out, int64_t B, int64_t d, int64_t order,
                                       double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t shift[kMaxStencil];
  for (int64_t t = 0; t <= order; ++t) shift[t] = static_cast<acc_t>(stencil_shift(order, t, eps));
  const int64_t n = B * d;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const acc_t xv = static_cast<acc_t>(x[e]), vv = static_cast<acc_t>(v[e]);
    for (int64_t t = 0; t <= order; ++t) out[t * n + e] = static_cast<scalar_t>(xv + shift[t] * vv);
  }
}

template <typename scalar_t>
__global__ void stencil_perturb_backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ gx,
                                                scalar_t* __restrict__ gv, int64_t B, int64_t d, int64_t order,
                                                double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t shift[kMaxStencil];
  for (int64_t t = 0; t <= order; ++t) shift[t] = static_cast<acc_t>(stencil_shift(order, t, eps));
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < B * d; e += int64_t(gridDim.x) * blockDim.x) {
    acc_t sx = 0, sv = 0;
    for (int64_t t = 0; t <= order; ++t) {
      const acc_t g = static_cast<acc_t>(grad[t * B * d + e]);
      sx += g;
      sv += shift[t] * g;
    }
    gx[e] = static_cast<scalar_t>(sx);
    gv[e] = static_cast<scalar_t>(sv);
  }
}

template <typename scalar_t>
__global__ void stencil_combine_kernel(const scalar_t* __restrict__ f, at::opmath_type<scalar_t>* __restrict__ out,
                                       int64_t B, int64_t order, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  double w[kMaxStencil];
  for (int64_t t = 0; t <= order; ++t) w[t] = stencil_weight(order, t, eps);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B; i += int64_t(gridDim.x) * blockDim.x) {
    double total = 0.0;
    for (int64_t t = 0; t <= order; ++t) total += w[t] * static_cast<double>(static_cast<acc_t>(f[t * B + i]));
    out[i] = static_cast<acc_t>(total);
  }
}

template <typename scalar_t>
__global__ void stencil_combine_backward_kernel(const double* __restrict__ grad, scalar_t* __restrict__ out,
                                                int64_t B, int64_t order, double eps) {
  double w[kMaxStencil];
  for (int64_t t = 0; t <= order; ++t) w[t] = stencil_weight(order, t, eps);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B; i += int64_t(gridDim.x) * blockDim.x) {
    const double g = grad[i];
    for (int64_t t = 0; t <= order; ++t) out[t * B + i] = static_cast<scalar_t>(w[t] * g);
  }
}

at::Tensor stencil_perturb_cuda(const at::Tensor& x_in, const at::Tensor& v_in, double eps, int64_t order) {
  check_stencil_perturb(x_in, v_in, eps, order);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1);
  at::Tensor out = new_output({(order + 1) * B, d}, x.options());
  if (out.numel() == 0) return out;
  FD_DISPATCH(x.scalar_type(), "stencil_perturb_cuda", [&] {
    stencil_perturb_kernel<scalar_t><<<elem_blocks(B * d), kThreads, 0, stream()>>>(
        x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B, d, order,
        eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> stencil_perturb_backward_cuda(const at::Tensor& grad_in, double eps,
                                                                 int64_t order) {
  check_stencil_perturb_backward(grad_in, eps, order);
  c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t B = grad.size(0) / (order + 1), d = grad.size(1);
  at::Tensor gx = new_output({B, d}, grad.options()), gv = new_output({B, d}, grad.options());
  if (gx.numel() == 0) return {gx, gv};
  FD_DISPATCH(grad.scalar_type(), "stencil_perturb_backward_cuda", [&] {
    stencil_perturb_backward_kernel<scalar_t><<<elem_blocks(B * d), kThreads, 0, stream()>>>(
        grad.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), gv.mutable_data_ptr<scalar_t>(), B, d,
        order, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gv};
}


at::Tensor stencil_combine_cuda(const at::Tensor& f_in, double eps, int64_t order) {
  check_stencil_combine(f_in, eps, order);
  c10::cuda::CUDAGuard guard(f_in.device());
  const at::Tensor f = f_in.contiguous();
  const int64_t B = f.size(1);
  at::Tensor out = new_loss_output(f, B);
  if (B == 0) return out;
  FD_DISPATCH(f.scalar_type(), "stencil_combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stencil_combine_kernel<scalar_t><<<elem_blocks(B), kThreads, 0, stream()>>>(
        f.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), B, order, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor stencil_combine_backward_cuda(const at::Tensor& grad_in, const at::Tensor& f, double eps,
                                         int64_t order) {
  check_stencil_combine_backward(grad_in, f, eps, order);
  c10::cuda::CUDAGuard guard(f.device());
  const int64_t B = f.size(1);
  const at::Tensor grad = grad_in.to(at::kDouble).contiguous();
  at::Tensor out = new_output(f.sizes(), f.options());
  if (out.numel() == 0) return out;
  FD_DISPATCH(f.scalar_type(), "stencil_combine_backward_cuda", [&] {
    stencil_combine_backward_kernel<scalar_t><<<elem_blocks(B), kThreads, 0, stream()>>>(
        grad.const_data_ptr<double>(), out.mutable_data_ptr<scalar_t>(), B, order, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------ fd_divergence
// One row group per direction row r = slice * B + sample (out's element r): the row's products summed
// in double (as the CPU kernel), scaled by c = d / (2 eps^2) once.
template <typename scalar_t, int G>
__global__ void divergence_kernel(const scalar_t* __restrict__ sp, const scalar_t* __restrict__ sm,
                                  at::opmath_type<scalar_t>* __restrict__ out, int64_t rows, int64_t d, double eps,
                                  int64_t kind, uint64_t seed, uint64_t off, double c) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (d + 3) / 4;
  for (int64_t r = RowGroup<G>::first(); r < rows; r += RowGroup<G>::stride()) {
    const acc_t scale = static_cast<acc_t>(row_scale(kind, eps, d, row_sum_sq<G>(kind, seed, off, r, d)));
    const scalar_t *pr = sp + r * d, *mr = sm + r * d;
    double total = 0.0;
    for (int64_t g = RowGroup<G>::lane(); g < groups; g += G) {
      const F32x4 z = raw_direction4(kind, seed, off, r, g);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t j = g * 4 + l;
        if (j < d)
          total += static_cast<double>(fd_divergence_elem<acc_t>(static_cast<acc_t>(pr[j]), static_cast<acc_t>(mr[j]),
                                                                 static_cast<acc_t>(z.v[l]) * scale));
      }
    }
    total = group_sum<G>(total);
    if (RowGroup<G>::lane() == 0) out[r] = static_cast<acc_t>(c * total);
  }
}

template <typename scalar_t, int G>
__global__ void divergence_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad,
                                           scalar_t* __restrict__ gp, scalar_t* __restrict__ gm, int64_t rows,
                                           int64_t d, double eps, int64_t kind, uint64_t seed, uint64_t off,
                                           double c) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (d + 3) / 4;
  for (int64_t r = RowGroup<G>::first(); r < rows; r += RowGroup<G>::stride()) {
    const acc_t scale = static_cast<acc_t>(row_scale(kind, eps, d, row_sum_sq<G>(kind, seed, off, r, d)));
    const acc_t gc = static_cast<acc_t>(static_cast<double>(grad[r]) * c);
    for (int64_t g = RowGroup<G>::lane(); g < groups; g += G) {
      const F32x4 z = raw_direction4(kind, seed, off, r, g);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t j = r * d + g * 4 + l;
        if (g * 4 + l < d) {
          const acc_t dp = fd_divergence_dsp<acc_t>(gc, static_cast<acc_t>(z.v[l]) * scale);
          gp[j] = static_cast<scalar_t>(dp);
          gm[j] = static_cast<scalar_t>(-dp);
        }
      }
    }
  }
}

at::Tensor fd_divergence_cuda(const at::Tensor& sp_in, const at::Tensor& sm_in, const at::Tensor& seed, double eps,
                              int64_t kind) {
  check_fd_divergence(sp_in, sm_in, seed, eps, kind);
  const auto [s, off] = read_seed(seed);
  c10::cuda::CUDAGuard guard(sp_in.device());
  const VrArgs a = vr_args(sp_in, sm_in);
  const at::Tensor &sp = a.sp, &sm = a.sm;
  const int64_t rows = a.n * a.B, d = a.d;
  at::Tensor out = new_output({a.n, a.B}, sp.options().dtype(loss_dtype(sp.scalar_type())));
  if (rows == 0) return out;
  FD_DISPATCH(sp.scalar_type(), "fd_divergence_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_row_group(d, [&](auto g) {
      constexpr int G = decltype(g)::value;
      divergence_kernel<scalar_t, G><<<row_blocks(rows, G), kThreads, 0, stream()>>>(
          sp.const_data_ptr<scalar_t>(), sm.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), rows, d, eps,
          kind, s, off, fd_divergence_scale(eps, d));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fd_divergence_backward_cuda(const at::Tensor& grad_in, const at::Tensor& sp_in,
                                                              const at::Tensor& sm_in, const at::Tensor& seed,
                                                              double eps, int64_t kind) {
  check_fd_divergence_backward(grad_in, sp_in, sm_in, seed, eps, kind);
  const auto [s, off] = read_seed(seed);
  c10::cuda::CUDAGuard guard(sp_in.device());
  const int64_t rows = sp_in.size(0) * sp_in.size(1), d = sp_in.size(2);
  const at::Tensor grad = loss_grad(grad_in, sp_in);
  // Linear in sp and sm: only their shape and dtype are used.
  at::Tensor gp = new_output(sp_in.sizes(), sp_in.options()), gm = new_output(sm_in.sizes(), sm_in.options());
  if (gp.numel() == 0) return {gp, gm};
  FD_DISPATCH(sp_in.scalar_type(), "fd_divergence_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_row_group(d, [&](auto g) {
      constexpr int G = decltype(g)::value;
      divergence_backward_kernel<scalar_t, G><<<row_blocks(rows, G), kThreads, 0, stream()>>>(
          grad.const_data_ptr<acc_t>(), gp.mutable_data_ptr<scalar_t>(), gm.mutable_data_ptr<scalar_t>(), rows, d,
          eps, kind, s, off, fd_divergence_scale(eps, d));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gp, gm};
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm_ext, CUDA, m) {
  m.impl("perturb", &perturb_cuda);
  m.impl("dsm_perturb", &dsm_perturb_cuda);
  m.impl("fd_ssm_quotient", &fd_ssm_quotient_cuda);
  m.impl("fd_ssm_quotient_backward", &fd_ssm_quotient_backward_cuda);
  m.impl("fd_ssm_vr", &fd_ssm_vr_cuda);
  m.impl("fd_ssm_vr_backward", &fd_ssm_vr_backward_cuda);
  m.impl("fd_dsm_quotient", &fd_dsm_quotient_cuda);
  m.impl("fd_dsm_quotient_backward", &fd_dsm_quotient_backward_cuda);
  m.impl("fd_dsm_noise_backward", &fd_dsm_noise_backward_cuda);
  m.impl("stencil_perturb", &stencil_perturb_cuda);
  m.impl("stencil_perturb_backward", &stencil_perturb_backward_cuda);
  m.impl("stencil_combine", &stencil_combine_cuda);
  m.impl("stencil_combine_backward", &stencil_combine_backward_cuda);
  m.impl("fd_divergence", &fd_divergence_cuda);
  m.impl("fd_divergence_backward", &fd_divergence_backward_cuda);
}

}  // namespace fdsm
