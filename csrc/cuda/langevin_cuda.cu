// CUDA kernel of the fused Langevin step (schema and contract in fd_ops.cpp, formula in fd_math.h,
// the same z stream as the CPU kernel).
//
// Work items are (sample, tile of kTile elements): a block-wide row group per item for long samples,
// a warp per sample for short ones (one tile). The per-sample norms are summed per tile in double
// and then over tiles, in tile order, by a second small kernel: deterministic, no atomics. The seed
// may be a device tensor, read by the kernel at run time, so a captured CUDA graph sees updates.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "../fd_common.h"
#include "../fd_math.h"
#include "cuda_rows.cuh"

namespace fdsm {
namespace {

using namespace cuda;

constexpr int64_t kTile = 4096;  // elements per work item for long samples (a multiple of 4)

struct SeedArg {
  const int64_t* device;  // (seed, offset) in device memory, or null
  uint64_t seed, offset;  // host values when device is null
  __device__ void get(uint64_t& s, uint64_t& o) const {
    if (device != nullptr) {
      s = static_cast<uint64_t>(device[0]);
      o = static_cast<uint64_t>(device[1]);
    } else {
      s = seed;
      o = offset;
    }
  }
};

template <typename scalar_t, int G>
// x and out are the same buffer for an in-place step, so neither is __restrict__ (a restrict x could be
// read through the non-coherent cache while out is written); score never overlaps either (the
// in-place check refuses it).
__global__ void langevin_kernel(const scalar_t* x, const scalar_t* __restrict__ score, scalar_t* out, const at::opmath_type<scalar_t>* __restrict__ alpha,
                                bool alpha_per_sample, const at::opmath_type<scalar_t>* __restrict__ noise_scale,
                                bool ns_per_sample, int64_t B, int64_t d, int64_t tiles, SeedArg seed_arg,
                                double lo, double hi, double* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  uint64_t seed, off;
  seed_arg.get(seed, off);
  const acc_t lo_a = static_cast<acc_t>(lo), hi_a = static_cast<acc_t>(hi);
  const int64_t tile_len = tiles == 1 ? d : kTile;
  for (int64_t item = RowGroup<G>::first(); item < B * tiles; item += RowGroup<G>::stride()) {
    const int64_t i = item / tiles;
    const int64_t j0 = (item % tiles) * tile_len, j1 = j0 + tile_len < d ? j0 + tile_len : d;
    const acc_t a = alpha[alpha_per_sample ? i : 0];
    const acc_t* b = noise_scale == nullptr ? nullptr : noise_scale + (ns_per_sample ? i : 0);
    const acc_t ns = step_noise_scale<acc_t>(a, b);
    double ss = 0.0, zz = 0.0, xx = 0.0;
    for (int64_t g = j0 / 4 + RowGroup<G>::lane(); g * 4 < j1; g += G) {
      const F32x4 z = langevin_noise4(seed, off, static_cast<uint64_t>(i), static_cast<uint64_t>(g));
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t j = g * 4 + l;
        if (j < j1) {
          const int64_t e = i * d + j;
          const acc_t sv = static_cast<acc_t>(score[e]);
          const acc_t zv = static_cast<acc_t>(z.v[l]);
          const scalar_t nv = static_cast<scalar_t>(
              clamp_keep_nan<acc_t>(langevin_update<acc_t>(static_cast<acc_t>(x[e]), sv, zv, a, ns), lo_a, hi_a));
          out[e] = nv;
          if (partial != nullptr) {
            const double xd = static_cast<double>(static_cast<acc_t>(nv));
            ss += static_cast<double>(sv) * static_cast<double>(sv);
            zz += static_cast<double>(zv) * static_cast<double>(zv);
            xx += xd * xd;
          }
        }
      }
    }
    if (partial != nullptr) {  // uniform over the group: every thread takes part in the sums
      ss = group_sum<G>(ss);
      zz = group_sum<G>(zz);
      xx = group_sum<G>(xx);
      if (RowGroup<G>::lane() == 0) {
        partial[3 * item] = ss;
        partial[3 * item + 1] = zz;
        partial[3 * item + 2] = xx;
      }
    }
  }
}

template <typename out_t>
__global__ void langevin_norms_kernel(const double* __restrict__ partial, out_t* __restrict__ norms, int64_t B,
                                      int64_t tiles) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < 3 * B; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = e / B, i = e % B;
    double total = 0.0;
    for (int64_t t = 0; t < tiles; ++t) total += partial[3 * (i * tiles + t) + k];
    norms[e] = static_cast<out_t>(sqrt(total));
  }
}

at::Tensor langevin_into(const at::Tensor& x, const at::Tensor& score_in, const at::Tensor& alpha_in,
                         const std::optional<at::Tensor>& noise_scale_in, const at::Tensor& seed, const LangevinArgs& a,
                         bool return_norms, at::Tensor& out) {
  SeedArg seed_arg{nullptr, 0, 0};
  at::Tensor seed_dev;
  if (seed.is_cuda()) {
    seed_dev = seed.contiguous();
    seed_arg.device = seed_dev.const_data_ptr<int64_t>();
  } else {
    std::tie(seed_arg.seed, seed_arg.offset) = read_seed(seed);
  }
  const at::Tensor score = score_in.contiguous();
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor alpha = alpha_in.to(acc).contiguous();
  const bool has_ns = noise_scale_in.has_value() && noise_scale_in->defined();
  const at::Tensor noise_scale = has_ns ? noise_scale_in->to(acc).contiguous() : at::Tensor();
  const int G = a.d <= 512 ? 32 : kThreads;
  const int64_t tiles = G == 32 ? 1 : std::max<int64_t>(1, (a.d + kTile - 1) / kTile);
  at::Tensor norms = new_output({3, return_norms ? a.B : 0}, x.options().dtype(loss_dtype(x.scalar_type())));
  if (a.B == 0 || a.d == 0) {
    if (return_norms) norms.zero_();
    return norms;
  }
  at::Tensor partial;
  if (return_norms) partial = at::empty({a.B * tiles * 3}, x.options().dtype(at::kDouble));
  FD_DISPATCH(x.scalar_type(), "langevin_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_row_group(a.d, [&](auto g) {
      constexpr int kG = decltype(g)::value;
      langevin_kernel<scalar_t, kG><<<row_blocks(a.B * tiles, kG), kThreads, 0, stream()>>>(
          x.const_data_ptr<scalar_t>(), score.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          alpha.const_data_ptr<acc_t>(), alpha.numel() != 1, has_ns ? noise_scale.const_data_ptr<acc_t>() : nullptr,
          has_ns && noise_scale.numel() != 1, a.B, a.d, tiles, seed_arg, a.lo, a.hi,
          return_norms ? partial.mutable_data_ptr<double>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (return_norms) {
    AT_DISPATCH_FLOATING_TYPES(norms.scalar_type(), "langevin_step_cuda_norms", [&] {
      langevin_norms_kernel<scalar_t><<<elem_blocks(3 * a.B), kThreads, 0, stream()>>>(
          partial.const_data_ptr<double>(), norms.mutable_data_ptr<scalar_t>(), a.B, tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return norms;
}

std::tuple<at::Tensor, at::Tensor> langevin_step_cuda(const at::Tensor& x_in, const at::Tensor& score,
                                                      const at::Tensor& alpha, const at::Tensor& seed,
                                                      std::optional<double> clamp_min,
                                                      std::optional<double> clamp_max, bool return_norms,
                                                      const std::optional<at::Tensor>& noise_scale) {
  check_langevin_step(x_in, score, alpha, seed, clamp_min, clamp_max, return_norms, noise_scale);
  const LangevinArgs a = langevin_args(x_in, score, alpha, clamp_min, clamp_max);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = new_output(x.sizes(), x.options());
  at::Tensor norms = langevin_into(x, score, alpha, noise_scale, seed, a, return_norms, out);
  return {out, norms};
}

at::Tensor langevin_step_inplace_cuda(at::Tensor& x, const at::Tensor& score, const at::Tensor& alpha,
                                      const at::Tensor& seed, std::optional<double> clamp_min,
                                      std::optional<double> clamp_max, bool return_norms,
                                      const std::optional<at::Tensor>& noise_scale) {
  check_langevin_step_(x, score, alpha, seed, clamp_min, clamp_max, return_norms, noise_scale);
  const LangevinArgs a = langevin_args(x, score, alpha, clamp_min, clamp_max);
  c10::cuda::CUDAGuard guard(x.device());
  // Each element is read then written by the same thread: stepping x in place is safe.
  return step_in_place(x, [&](const at::Tensor& src, at::Tensor& out) {
    return langevin_into(src, score, alpha, noise_scale, seed, a, return_norms, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm_ext, CUDA, m) {
  m.impl("langevin_step", &langevin_step_cuda);
  m.impl("langevin_step_", &langevin_step_inplace_cuda);
}

}  // namespace fdsm
