// The one place where fdsm_ext's finite-difference formulas and its random
// direction stream are written in C++. Every function here is usable from host
// code (the CPU kernels) and from device code (the CUDA kernels), so both
// devices compute the same numbers from the same seed/offset.
//
// Bitwise reproducibility across devices: the direction stream uses only
// integer arithmetic and correctly rounded IEEE operations (+, -, *, /, sqrt,
// int->float conversion). The transcendental functions of the Box-Muller
// transform are evaluated with the fixed polynomials below instead of the
// platform's logf/sinf/cosf, whose last bit differs between glibc and CUDA.
// Builds must not contract a*b+c into an FMA here (setup.py passes
// -ffp-contract=off to the host compiler and --fmad=false to nvcc).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fdsm {

// Direction kinds, as passed through the op schema (`int kind`).
enum DirectionKind : int64_t {
  kSphere = 0,      // u uniform on the unit sphere: v = eps * g / ||g||, g ~ N(0, I)
  kRademacher = 1,  // u_j = +-1/sqrt(d): v = eps * u, ||v|| = eps exactly
  kGaussian = 2,    // u = g / sqrt(d): E[u u^T] = I/d
};

// ---------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator also used
// by cuRAND and PyTorch's CUDA generator. Known-answer test in the test suite.
struct U32x4 {
  uint32_t x, y, z, w;
};

FD_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

FD_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c.x, hi0, lo0);
    mulhilo32(kM1, c.z, hi1, lo1);
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// The stream: element j of direction row r (row = slice * B + sample) uses
// lane (j & 3) of Philox(counter = (j >> 2, r, offset_lo, offset_hi),
// key = (seed_lo, seed_hi)).
FD_HD U32x4 direction_bits(uint64_t seed, uint64_t offset, uint64_t row, uint64_t group) {
  return philox4x32_10(
      U32x4{static_cast<uint32_t>(group), static_cast<uint32_t>(row),
            static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FD_HD float bits_as_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

FD_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

// (2k + 1) / 2^24 with k the top 23 bits: exactly representable, in (0, 1).
FD_HD float open_unit(uint32_t b) {
  return static_cast<float>(((b >> 9) << 1) | 1u) * 5.9604644775390625e-08f;
}

// ln(u) for u in (0, 1]: u = m * 2^e with m in [sqrt(1/2), sqrt(2)), then
// ln m = 2 atanh(s), s = (m - 1)/(m + 1), |s| < 0.172, odd series to s^11.
FD_HD float portable_log(float u) {
  const uint32_t b = float_as_bits(u);
  int e = static_cast<int>((b >> 23) & 0xffu) - 127;
  float m = bits_as_float((b & 0x007fffffu) | 0x3f800000u);
  if (m > 1.41421356f) {
    m = m * 0.5f;
    e += 1;
  }
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 0.0909090909f;            // 1/11
  p = p * s2 + 0.111111111f;          // 1/9
  p = p * s2 + 0.142857143f;          // 1/7
  p = p * s2 + 0.2f;                  // 1/5
  p = p * s2 + 0.333333333f;          // 1/3
  p = p * s2 + 1.0f;
  return static_cast<float>(e) * 0.693147181f + 2.0f * s * p;
}

// cos and sin of 2*pi*b/2^32: the top two bits pick the quadrant exactly; the
// rest is an angle phi in [-pi/4, pi/4] about the quadrant's midpoint, where
// Taylor polynomials to phi^9 / phi^10 are accurate to ~1e-9.
FD_HD void portable_sincos_turn(uint32_t b, float& c, float& s) {
  const uint32_t q = b >> 30;
  const float frac = static_cast<float>(b & 0x3fffffffu) * 9.31322574615478515625e-10f;
  const float phi = (frac - 0.5f) * 1.57079632679f;
  const float p2 = phi * phi;
  float sn = 2.75573192e-06f;                // 1/9!
  sn = sn * p2 - 1.98412698e-04f;            // 1/7!
  sn = sn * p2 + 8.33333333e-03f;            // 1/5!
  sn = sn * p2 - 1.66666667e-01f;            // 1/3!
  sn = (sn * p2) * phi + phi;
  float cs = -2.75573192e-07f;               // 1/10!
  cs = cs * p2 + 2.48015873e-05f;            // 1/8!
  cs = cs * p2 - 1.38888889e-03f;            // 1/6!
  cs = cs * p2 + 4.16666667e-02f;            // 1/4!
  cs = cs * p2 - 0.5f;
  cs = cs * p2 + 1.0f;
  // Rotate by pi/4 (the midpoint), then by q * pi/2 (exact sign/swap).
  const float c45 = (cs - sn) * 0.707106781f;
  const float s45 = (cs + sn) * 0.707106781f;
  switch (q) {
    case 0: c = c45; s = s45; break;
    case 1: c = -s45; s = c45; break;
    case 2: c = -c45; s = -s45; break;
    default: c = s45; s = -c45; break;
  }
}

// Four standard normals (two Box-Muller pairs) from one Philox block.
struct F32x4 {
  float v[4];
};

FD_HD F32x4 box_muller4(U32x4 b) {
  F32x4 out;
  float c, s;
  const float r0 = sqrtf(-2.0f * portable_log(open_unit(b.x)));
  portable_sincos_turn(b.y, c, s);
  out.v[0] = r0 * c;
  out.v[1] = r0 * s;
  const float r1 = sqrtf(-2.0f * portable_log(open_unit(b.z)));
  portable_sincos_turn(b.w, c, s);
  out.v[2] = r1 * c;
  out.v[3] = r1 * s;
  return out;
}

// Unscaled direction values of one Philox block: standard normals for
// sphere/gaussian, +-1 for rademacher. The row's scale (row_scale below)
// turns them into v.
FD_HD F32x4 raw_direction4(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row,
                           uint64_t group) {
  const U32x4 b = direction_bits(seed, offset, row, group);
  if (kind == kRademacher) {
    F32x4 out;
    out.v[0] = (b.x >> 31) ? 1.0f : -1.0f;
    out.v[1] = (b.y >> 31) ? 1.0f : -1.0f;
    out.v[2] = (b.z >> 31) ? 1.0f : -1.0f;
    out.v[3] = (b.w >> 31) ? 1.0f : -1.0f;
    return out;
  }
  return box_muller4(b);
}

// The sphere's row sum of squares, the same bits on every device and in every reduction order: each
// raw value's square (exact in double) is truncated to an integer multiple of 2^-F, and the integers
// are summed (integer addition is associative, so the CPU's sequential sum, the CUDA butterfly and
// Triton's tile tree agree exactly). |raw| < 5.8, so raw^2 < 2^6; with F = 57 - bit_length(d) a row of
// d values sums below 2^63, and the truncation error per element is below 2^-F <= 2^-23.
FD_HD int sphere_fraction_bits(int64_t d) {
  int bits = 0;
  for (int64_t v = d > 0 ? d : 1; v != 0; v >>= 1) ++bits;
  return 57 - bits;
}
// 2^k, exactly, for 0 <= k <= 1023: the biased exponent 1023 + k in a double's bits (a loop of k
// doublings is a chain of dependent multiplies, ~54 of them per row here).
FD_HD double exact_pow2(int k) {
  const uint64_t bits = static_cast<uint64_t>(1023 + k) << 52;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}
// 2^F, exactly.
FD_HD double sphere_unit(int64_t d) { return exact_pow2(sphere_fraction_bits(d)); }
FD_HD uint64_t sphere_sq_fixed(float raw, double unit) {
  const double r = static_cast<double>(raw);
  return static_cast<uint64_t>(r * r * unit);
}
FD_HD double sphere_sum_sq(uint64_t total, double unit) { return static_cast<double>(total) / unit; }

// v = raw * row_scale. For the sphere, sum_sq is the row's sphere_sum_sq; it is ignored otherwise.
FD_HD double row_scale(int64_t kind, double eps, int64_t dim, double sum_sq) {
  if (kind == kSphere) return eps / sqrt(sum_sq);
  return eps / sqrt(static_cast<double>(dim));
}

// ---------------------------------------------------------------------------
// FD-SSM quotient (docs/math.md "FD-SSM, log-density form"), for one direction:
//   l = c * [ (f+ - f-)^2 / 8 + (f+ + f- - 2 f0) ],  c = dim_scale / eps^2.
template <typename acc_t>
FD_HD acc_t fd_ssm_term(acc_t f0, acc_t fp, acc_t fm) {
  const acc_t diff = fp - fm;
  return diff * diff * acc_t(0.125) + ((fp + fm) - acc_t(2) * f0);
}
// d term / d f+ ; d term / d f- is fd_ssm_dfm, d term / d f0 is -2.
template <typename acc_t>
FD_HD acc_t fd_ssm_dfp(acc_t fp, acc_t fm) { return (fp - fm) * acc_t(0.25) + acc_t(1); }
template <typename acc_t>
FD_HD acc_t fd_ssm_dfm(acc_t fp, acc_t fm) { return (fm - fp) * acc_t(0.25) + acc_t(1); }

// FD-SSM-VR, per element of a row (docs/math.md "FD-SSM-VR"):
//   l = ||s+ + s-||^2 / 8 + k * v^T (s+ - s-),  k = dim_scale / (2 eps^2).
template <typename acc_t>
FD_HD acc_t fd_ssm_vr_elem(acc_t sp, acc_t sm, acc_t v, acc_t k) {
  const acc_t sum = sp + sm;
  return sum * sum * acc_t(0.125) + k * v * (sp - sm);
}
// d/ds+ = (s+ + s-)/4 + k v ; d/ds- = (s+ + s-)/4 - k v.
template <typename acc_t>
FD_HD acc_t fd_ssm_vr_dsp(acc_t sp, acc_t sm, acc_t v, acc_t k) { return (sp + sm) * acc_t(0.25) + k * v; }
template <typename acc_t>
FD_HD acc_t fd_ssm_vr_dsm(acc_t sp, acc_t sm, acc_t v, acc_t k) { return (sp + sm) * acc_t(0.25) - k * v; }

// FD-DSM (docs/math.md "FD-DSM"): r = (f+ - f-)/2 + v^T (x~ - x) / sigma^2,
//   l = (c / 2) * r^2, c = dim_scale / eps^2; dl/dr = c * r.
template <typename acc_t>
FD_HD acc_t fd_dsm_residual(acc_t fp, acc_t fm, acc_t proj, acc_t sigma) {
  return (fp - fm) * acc_t(0.5) + proj / (sigma * sigma);
}

// T-th order central stencil (paper Appendix C.1, Algorithm 1):
//   D_v^T f(x) ~ (2 eps)^-T sum_t (-1)^t C(T, t) f(x + (T - 2t) eps v).
FD_HD double stencil_shift(int64_t order, int64_t t, double eps) {
  return static_cast<double>(order - 2 * t) * eps;
}
FD_HD double stencil_weight(int64_t order, int64_t t, double eps) {
  double binom = 1.0;  // C(order, t)
  for (int64_t i = 1; i <= t; ++i) binom = binom * static_cast<double>(order - t + i) / static_cast<double>(i);
  double denom = 1.0;
  for (int64_t i = 0; i < order; ++i) denom *= 2.0 * eps;
  return ((t & 1) ? -binom : binom) / denom;
}

// FD divergence (docs/math.md "FD divergence"): for v = eps u with E[u u^T] = I/d (every kind),
//   div = c * sum_j v_j (s+_j - s-_j),  c = d / (2 eps^2),
// an estimate of tr(ds/dx) (Hutchinson's u^T J u times d) to O(eps^2). Each element's product is
// rounded in acc_t and summed in double; the sum is scaled by c (a double) once per row.
template <typename acc_t>
FD_HD acc_t fd_divergence_elem(acc_t sp, acc_t sm, acc_t v) { return v * (sp - sm); }
FD_HD double fd_divergence_scale(double eps, int64_t dim) {
  return static_cast<double>(dim) / (2.0 * eps * eps);
}
// d div / d s+_j = c v_j (and d div / d s-_j = -c v_j): gc = g * c, rounded to acc_t once per row.
template <typename acc_t>
FD_HD acc_t fd_divergence_dsp(acc_t gc, acc_t v) { return gc * v; }

// ---------------------------------------------------------------------------
// Langevin dynamics (docs/math.md "Langevin dynamics"): x <- x + alpha s + sqrt(2 alpha) z, z ~ N(0, I),
// then an optional clamp to the data range; generalised to x + a s + b z with a given noise scale b
// (the VE SDE's reverse-diffusion predictor, docs/likelihood.md "Predictor-corrector sampling"). z is
// the gaussian kind of the direction stream with row = sample index and group = element >> 2, so
// element j of a sample is lane (j & 3) of langevin_noise4(seed, offset, sample, j >> 2).
FD_HD F32x4 langevin_noise4(uint64_t seed, uint64_t offset, uint64_t sample, uint64_t group) {
  return raw_direction4(kGaussian, seed, offset, sample, group);
}

// sqrt(2 alpha), once per sample, in double: correctly rounded on every device, so the float noise
// scale is the same bits on the CPU and the GPU.
FD_HD double langevin_noise_scale(double alpha) { return sqrt(2.0 * alpha); }

// The noise scale b of the step x + a s + b z: the caller's b when it gives one (the VE predictor's
// sqrt(delta) with a = delta), already rounded to acc_t by the host, else the Langevin step's sqrt(2 a).
template <typename acc_t>
FD_HD acc_t step_noise_scale(acc_t alpha, const acc_t* noise_scale) {
  return noise_scale != nullptr ? *noise_scale : static_cast<acc_t>(langevin_noise_scale(static_cast<double>(alpha)));
}

// The update of one element; noise_scale = step_noise_scale(alpha, b). Written as two roundings
// (x + alpha s, then + noise_scale z) that no build contracts into an FMA (see the top of this file).
template <typename acc_t>
FD_HD acc_t langevin_update(acc_t x, acc_t s, acc_t z, acc_t alpha, acc_t noise_scale) {
  return (x + alpha * s) + noise_scale * z;
}

// Clamp to [lo, hi] that keeps NaN (both comparisons are false), so a sampler that diverged is seen
// as diverged; "no bound" is lo = -inf or hi = +inf.
template <typename acc_t>
FD_HD acc_t clamp_keep_nan(acc_t v, acc_t lo, acc_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

}  // namespace fdsm
