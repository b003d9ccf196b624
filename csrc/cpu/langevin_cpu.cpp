// CPU kernel of the fused Langevin step (schema and contract in fd_ops.cpp, formula in fd_math.h).
//
// Work is split into tiles of kTile elements of one sample, so that a single large sample (B = 1,
// d = 1e7) is still spread over every thread. The per-sample norms are summed per tile in double and
// then over the tiles in tile order: the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../fd_common.h"
#include "../fd_math.h"
#include "directions_cpu.h"

namespace fdsm {
namespace {

// Elements per tile: a multiple of 4 (one Philox block feeds 4 elements), ~32-64 KiB of x + score.
constexpr int64_t kTile = 4096;

// sum_j p[j]^2 in double over elements converted to their accumulation type, with 8 interleaved
// partial sums (independent add chains, ~8x the throughput of one) added in a fixed order: the result
// depends only on n, not on threads.
template <typename T>
double sum_squares(const T* p, int64_t n) {
  constexpr int kAcc = 8;
  double acc[kAcc] = {};
  int64_t j = 0;
  for (; j + kAcc <= n; j += kAcc) {
    for (int k = 0; k < kAcc; ++k) {
      const double v = static_cast<double>(static_cast<at::opmath_type<T>>(p[j + k]));
      acc[k] += v * v;
    }
  }
  for (; j < n; ++j) {
    const double v = static_cast<double>(static_cast<at::opmath_type<T>>(p[j]));
    acc[j % kAcc] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// x_new of every element into out (which may be x itself); sums of s^2, z^2, x_new^2 per tile into
// partial[3 * tile + k] when partial is not null.
template <typename scalar_t>
void langevin_tiles(const scalar_t* x, const scalar_t* s, scalar_t* out, const at::opmath_type<scalar_t>* alpha,
                    bool alpha_per_sample, const at::opmath_type<scalar_t>* noise_scale, bool ns_per_sample,
                    int64_t B, int64_t d, uint64_t seed, uint64_t off, double lo, double hi, double* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles = std::max<int64_t>(1, (d + kTile - 1) / kTile);
  const acc_t lo_a = static_cast<acc_t>(lo), hi_a = static_cast<acc_t>(hi);
  const int64_t grain = std::max<int64_t>(1, kTile / std::max<int64_t>(1, std::min(d, kTile)));
  at::parallel_for(0, B * tiles, grain, [&](int64_t beg, int64_t end) {
    for (int64_t t = beg; t < end; ++t) {
      const int64_t i = t / tiles, j0 = (t % tiles) * kTile, j1 = std::min(d, j0 + kTile);
      const acc_t a = alpha[alpha_per_sample ? i : 0];
      const acc_t* b = noise_scale == nullptr ? nullptr : noise_scale + (ns_per_sample ? i : 0);
      const acc_t ns = step_noise_scale<acc_t>(a, b);
      const scalar_t* xr = x + i * d;
      const scalar_t* sr = s + i * d;
      scalar_t* orow = out + i * d;
      // z of this tile: langevin_noise4's values (the gaussian stream, row = sample), all at once.
      float z[kTile];
      const int64_t n = j1 - j0;
      raw_direction_values(kGaussian, seed, off, static_cast<uint64_t>(i), j0, n, z);
      for (int64_t j = j0; j < j1; ++j) {
        orow[j] = static_cast<scalar_t>(clamp_keep_nan<acc_t>(
            langevin_update<acc_t>(static_cast<acc_t>(xr[j]), static_cast<acc_t>(sr[j]),
                                   static_cast<acc_t>(z[j - j0]), a, ns),
            lo_a, hi_a));
      }
      if (partial != nullptr) {
        partial[3 * t] = sum_squares(sr + j0, n);
        partial[3 * t + 1] = sum_squares(z, n);
        partial[3 * t + 2] = sum_squares(orow + j0, n);
      }
    }
  });
}

// Runs the step from x into out (a contiguous tensor of x's shape, possibly x itself) and returns the
// norms (3, B), or a (3, 0) tensor when not requested.
at::Tensor langevin_into(const at::Tensor& x, const at::Tensor& score_in, const at::Tensor& alpha_in,
                         const std::optional<at::Tensor>& noise_scale_in, const at::Tensor& seed, const LangevinArgs& a,
                         bool return_norms, at::Tensor& out) {
  const auto [s, off] = read_seed(seed);
  const at::Tensor score = score_in.contiguous();
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor alpha = alpha_in.to(acc).contiguous();
  const bool has_ns = noise_scale_in.has_value() && noise_scale_in->defined();
  const at::Tensor noise_scale = has_ns ? noise_scale_in->to(acc).contiguous() : at::Tensor();
  const int64_t tiles = std::max<int64_t>(1, (a.d + kTile - 1) / kTile);
  at::Tensor norms = new_output({3, return_norms ? a.B : 0}, x.options().dtype(loss_dtype(x.scalar_type())));
  if (a.B == 0) return norms;
  std::vector<double> partial(return_norms ? 3 * a.B * tiles : 0);
  FD_DISPATCH(x.scalar_type(), "langevin_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    langevin_tiles<scalar_t>(x.const_data_ptr<scalar_t>(), score.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(), alpha.const_data_ptr<acc_t>(), alpha.numel() != 1,
                             has_ns ? noise_scale.const_data_ptr<acc_t>() : nullptr, has_ns && noise_scale.numel() != 1,
                             a.B, a.d, s, off, a.lo, a.hi, return_norms ? partial.data() : nullptr);
  });
  if (return_norms) {
    AT_DISPATCH_FLOATING_TYPES(norms.scalar_type(), "langevin_step_cpu_norms", [&] {
      scalar_t* np = norms.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < a.B; ++i) {
        for (int k = 0; k < 3; ++k) {
          double total = 0.0;
          for (int64_t t = 0; t < tiles; ++t) total += partial[3 * (i * tiles + t) + k];
          np[k * a.B + i] = static_cast<scalar_t>(std::sqrt(total));
        }
      }
    });
  }
  return norms;
}

std::tuple<at::Tensor, at::Tensor> langevin_step_cpu(const at::Tensor& x_in, const at::Tensor& score,
                                                     const at::Tensor& alpha, const at::Tensor& seed,
                                                     std::optional<double> clamp_min, std::optional<double> clamp_max,
                                                     bool return_norms, const std::optional<at::Tensor>& noise_scale) {
  check_langevin_step(x_in, score, alpha, seed, clamp_min, clamp_max, return_norms, noise_scale);
  const LangevinArgs a = langevin_args(x_in, score, alpha, clamp_min, clamp_max);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = new_output(x.sizes(), x.options());
  at::Tensor norms = langevin_into(x, score, alpha, noise_scale, seed, a, return_norms, out);
  return {out, norms};
}

at::Tensor langevin_step_inplace_cpu(at::Tensor& x, const at::Tensor& score, const at::Tensor& alpha,
                                     const at::Tensor& seed, std::optional<double> clamp_min,
                                     std::optional<double> clamp_max, bool return_norms,
                                     const std::optional<at::Tensor>& noise_scale) {
  check_langevin_step_(x, score, alpha, seed, clamp_min, clamp_max, return_norms, noise_scale);
  const LangevinArgs a = langevin_args(x, score, alpha, clamp_min, clamp_max);
  return step_in_place(x, [&](const at::Tensor& src, at::Tensor& out) {
    return langevin_into(src, score, alpha, noise_scale, seed, a, return_norms, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fdsm_ext, CPU, m) {
  m.impl("langevin_step", &langevin_step_cpu);
  m.impl("langevin_step_", &langevin_step_inplace_cpu);
}

}  // namespace fdsm
