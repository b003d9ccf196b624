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
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// A tile's update and its three norms' sums, vectorised with GCC vector types (and compiled for AVX2
// and for the baseline ISA, target_clones picking one at load time). Both are bitwise the scalar
// code's: every lane runs its element through the same IEEE operations in the same order.
//
// The update: langevin_update then clamp_keep_nan, 8 float (4 double) lanes at a time. (GCC does not
// vectorise the scalar loop itself: out may be x, and its runtime alias check then fails.)
//
// The three norms' sums of a tile in one pass: sum_squares's 8 chains become two 4-lane
// double vectors (lane k of lo / hi is acc[k] / acc[4 + k]), fed the same elements in the same order
// with the same IEEE operations (no FMA: -ffp-contract=off), then combined in sum_squares's order; so
// the sums are bitwise sum_squares's on every ISA, AVX2 or not (what target_clones picks at load time).
#define FDSM_TILE_SIMD 1
// The helpers below pass 32-byte vectors by value; they are always inlined, so no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef double d4 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));

template <typename T>
__attribute__((always_inline)) inline d4 widen4(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    f4 v;
    std::memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, d4);
  } else {
    d4 v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
}

template <typename T>
__attribute__((always_inline)) inline double finish_squares(d4 lo, d4 hi, const T* p, int64_t j, int64_t n) {
  double acc[8] = {lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]};
  for (; j < n; ++j) {
    const double v = static_cast<double>(p[j]);
    acc[j % 8] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// sums[k] = sum_squares of s, z, o (k = 0, 1, 2) over n elements.
template <typename T>
__attribute__((always_inline)) inline void sum_squares3_body(const T* s, const float* z, const T* o, int64_t n,
                                                             double* sums) {
  d4 s0 = {}, s1 = {}, z0 = {}, z1 = {}, o0 = {}, o1 = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const d4 a = widen4(s + j), b = widen4(s + j + 4);
    s0 += a * a;
    s1 += b * b;
    const d4 c = widen4(z + j), d = widen4(z + j + 4);
    z0 += c * c;
    z1 += d * d;
    const d4 e = widen4(o + j), f = widen4(o + j + 4);
    o0 += e * e;
    o1 += f * f;
  }
  sums[0] = finish_squares(s0, s1, s, j, n);
  sums[1] = finish_squares(z0, z1, z, j, n);
  sums[2] = finish_squares(o0, o1, o, j, n);
}

typedef float f8 __attribute__((vector_size(32)));

template <typename V, typename T>
__attribute__((always_inline)) inline V splat(T v) {  // (not V{} + v: that turns a bound -0.0 into +0.0)
  V r;
  for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(T)); ++l) r[l] = v;
  return r;
}

__attribute__((target_clones("avx2", "default"))) void update_f32(const float* x, const float* s, const float* z,
                                                                    float* out, int64_t n, float a, float ns, float lo,
                                                                    float hi) {
  const f8 lov = splat<f8>(lo), hiv = splat<f8>(hi);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    f8 xv, sv, zv;
    std::memcpy(&xv, x + j, sizeof xv);
    std::memcpy(&sv, s + j, sizeof sv);
    std::memcpy(&zv, z + j, sizeof zv);
    f8 v = (xv + a * sv) + ns * zv;
    v = v < lov ? lov : (v > hiv ? hiv : v);
    std::memcpy(out + j, &v, sizeof v);
  }
  for (; j < n; ++j) out[j] = clamp_keep_nan<float>(langevin_update<float>(x[j], s[j], z[j], a, ns), lo, hi);
}

__attribute__((target_clones("avx2", "default"))) void update_f64(const double* x, const double* s, const float* z,
                                                                    double* out, int64_t n, double a, double ns,
                                                                    double lo, double hi) {
  const d4 lov = splat<d4>(lo), hiv = splat<d4>(hi);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    d4 xv, sv;
    std::memcpy(&xv, x + j, sizeof xv);
    std::memcpy(&sv, s + j, sizeof sv);
    d4 v = (xv + a * sv) + ns * widen4(z + j);
    v = v < lov ? lov : (v > hiv ? hiv : v);
    std::memcpy(out + j, &v, sizeof v);
  }
  for (; j < n; ++j) {
    out[j] = clamp_keep_nan<double>(langevin_update<double>(x[j], s[j], static_cast<double>(z[j]), a, ns), lo, hi);
  }
}

__attribute__((target_clones("avx2", "default"))) void sum_squares3_f32(const float* s, const float* z, const float* o,
                                                                          int64_t n, double* sums) {
  sum_squares3_body(s, z, o, n, sums);
}

__attribute__((target_clones("avx2", "default"))) void sum_squares3_f64(const double* s, const float* z,
                                                                          const double* o, int64_t n, double* sums) {
  sum_squares3_body(s, z, o, n, sums);
}
#endif

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
#ifdef FDSM_TILE_SIMD
      if constexpr (std::is_same_v<scalar_t, float>) {
        update_f32(xr + j0, sr + j0, z, orow + j0, n, a, ns, lo_a, hi_a);
      } else if constexpr (std::is_same_v<scalar_t, double>) {
        update_f64(xr + j0, sr + j0, z, orow + j0, n, a, ns, lo_a, hi_a);
      } else
#endif
      for (int64_t j = j0; j < j1; ++j) {
        orow[j] = static_cast<scalar_t>(clamp_keep_nan<acc_t>(
            langevin_update<acc_t>(static_cast<acc_t>(xr[j]), static_cast<acc_t>(sr[j]),
                                   static_cast<acc_t>(z[j - j0]), a, ns),
            lo_a, hi_a));
      }
      if (partial != nullptr) {
#ifdef FDSM_TILE_SIMD
        if constexpr (std::is_same_v<scalar_t, float>) {
          sum_squares3_f32(sr + j0, z, orow + j0, n, partial + 3 * t);
          continue;
        } else if constexpr (std::is_same_v<scalar_t, double>) {
          sum_squares3_f64(sr + j0, z, orow + j0, n, partial + 3 * t);
          continue;
        }
#endif
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
