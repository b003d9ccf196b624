// Lane-parallel transcription of fd_math.h's direction stream (Philox4x32-10, then the portable
// Box-Muller). Each vector lane runs one Philox block through exactly the scalar code's operations in
// the same order -- integer ops, and IEEE +, -, *, /, sqrt, int->float, none contracted into an FMA
// (-ffp-contract=off) -- so the values are bitwise those of raw_direction4 (tests/test_ops.py checks
// this against the scalar code and the pure-torch Philox). Branches of the scalar code become lane
// selects. Two paths: GCC vector extensions compiled for the baseline ISA, and AVX2 intrinsics where
// the CPU and ATen's CPU capability allow (avx2_allowed); running the tests under
// ATEN_CPU_CAPABILITY=default and =avx2 checks both.
#include "directions_cpu.h"

// The lane helpers below pass 32-byte vectors by value; they are always inlined, so no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Version.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../fd_math.h"

namespace fdsm {
namespace {

std::atomic<bool> g_vector_stream{true};

constexpr int kVectorLanes = 8;  // Philox blocks per vector step, on every path

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
#define FDSM_SIMD_STREAM 1
#define FDSM_LANE __attribute__((always_inline)) inline

constexpr int kLanes = kVectorLanes;  // 8 x 32 bits, one AVX2 register
typedef uint32_t u32v __attribute__((vector_size(32)));
typedef int32_t i32v __attribute__((vector_size(32)));
typedef float f32v __attribute__((vector_size(32)));
typedef uint64_t u64v __attribute__((vector_size(32)));

// mulhilo32 of every lane: even and odd lanes as the two halves of 64-bit lanes (little-endian).
FDSM_LANE void mulhilo(uint32_t m, u32v a, u32v& hi, u32v& lo) {
  const u64v a64 = reinterpret_cast<u64v>(a);
  const u64v even = (a64 & 0xffffffffull) * static_cast<uint64_t>(m);
  const u64v odd = (a64 >> 32) * static_cast<uint64_t>(m);
  lo = reinterpret_cast<u32v>((even & 0xffffffffull) | (odd << 32));
  hi = reinterpret_cast<u32v>((even >> 32) | (odd & 0xffffffff00000000ull));
}

// Exact for v < 2^31 (every use below), where signed and unsigned conversion agree.
FDSM_LANE f32v to_float(u32v v) { return __builtin_convertvector(reinterpret_cast<i32v>(v), f32v); }

FDSM_LANE f32v open_unit(u32v b) { return to_float(((b >> 9) << 1) | 1u) * 5.9604644775390625e-08f; }

FDSM_LANE f32v log_lanes(f32v u) {  // portable_log
  const u32v b = reinterpret_cast<u32v>(u);
  i32v e = reinterpret_cast<i32v>((b >> 23) & 0xffu) - 127;
  f32v m = reinterpret_cast<f32v>((b & 0x007fffffu) | 0x3f800000u);
  const i32v big = m > 1.41421356f;  // -1 where true
  m = big ? m * 0.5f : m;
  e = e - big;
  const f32v s = (m - 1.0f) / (m + 1.0f);
  const f32v s2 = s * s;
  f32v p = s2 * 0.0909090909f + 0.111111111f;
  p = p * s2 + 0.142857143f;
  p = p * s2 + 0.2f;
  p = p * s2 + 0.333333333f;
  p = p * s2 + 1.0f;
  return __builtin_convertvector(e, f32v) * 0.693147181f + 2.0f * s * p;
}

FDSM_LANE f32v sqrt_lanes(f32v v) {
  f32v r;
  for (int i = 0; i < kLanes; ++i) r[i] = __builtin_sqrtf(v[i]);  // one vsqrtps with -fno-math-errno
  return r;
}

FDSM_LANE void sincos_turn_lanes(u32v b, f32v& c, f32v& s) {  // portable_sincos_turn
  const u32v q = b >> 30;
  const f32v frac = to_float(b & 0x3fffffffu) * 9.31322574615478515625e-10f;
  const f32v phi = (frac - 0.5f) * 1.57079632679f;
  const f32v p2 = phi * phi;
  f32v sn = p2 * 2.75573192e-06f - 1.98412698e-04f;
  sn = sn * p2 + 8.33333333e-03f;
  sn = sn * p2 - 1.66666667e-01f;
  sn = (sn * p2) * phi + phi;
  f32v cs = p2 * -2.75573192e-07f + 2.48015873e-05f;
  cs = cs * p2 - 1.38888889e-03f;
  cs = cs * p2 + 4.16666667e-02f;
  cs = cs * p2 - 0.5f;
  cs = cs * p2 + 1.0f;
  const f32v c45 = (cs - sn) * 0.707106781f;
  const f32v s45 = (cs + sn) * 0.707106781f;
  // Quadrant q: (c, s) = (c45, s45), (-s45, c45), (-c45, -s45), (s45, -c45).
  const i32v swap = reinterpret_cast<i32v>(q & 1u) != 0;
  const f32v a = swap ? s45 : c45, bb = swap ? c45 : s45;
  c = (reinterpret_cast<i32v>((q + 1u) & 2u) != 0) ? -a : a;
  s = (reinterpret_cast<i32v>(q) >= 2) ? -bb : bb;
}

// kLanes consecutive blocks from block g0 of `row`: 4 * kLanes values into out. Compiled for the
// baseline ISA (SSE2 on x86-64): the portable path, and the one ATEN_CPU_CAPABILITY=default runs.
void blocks_simd(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row, uint64_t g0, int64_t n_vec,
                 float* out) {
  for (int64_t v = 0; v < n_vec; ++v, g0 += kLanes, out += 4 * kLanes) {
    u32v x;
    for (int l = 0; l < kLanes; ++l) x[l] = static_cast<uint32_t>(g0 + l);
    u32v y = u32v{} + static_cast<uint32_t>(row);
    u32v z = u32v{} + static_cast<uint32_t>(offset);
    u32v w = u32v{} + static_cast<uint32_t>(offset >> 32);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {  // philox4x32_10
      if (round > 0) {
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
      }
      u32v hi0, lo0, hi1, lo1;
      mulhilo(0xD2511F53u, x, hi0, lo0);
      mulhilo(0xCD9E8D57u, z, hi1, lo1);
      x = hi1 ^ y ^ k0;
      y = lo1;
      z = hi0 ^ w ^ k1;
      w = lo0;
    }
    f32v v0, v1, v2, v3;
    if (kind == kRademacher) {
      const f32v one = f32v{} + 1.0f;
      v0 = reinterpret_cast<i32v>(x >> 31) != 0 ? one : -one;
      v1 = reinterpret_cast<i32v>(y >> 31) != 0 ? one : -one;
      v2 = reinterpret_cast<i32v>(z >> 31) != 0 ? one : -one;
      v3 = reinterpret_cast<i32v>(w >> 31) != 0 ? one : -one;
    } else {  // box_muller4
      f32v c, s;
      const f32v r0 = sqrt_lanes(-2.0f * log_lanes(open_unit(x)));
      sincos_turn_lanes(y, c, s);
      v0 = r0 * c;
      v1 = r0 * s;
      const f32v r1 = sqrt_lanes(-2.0f * log_lanes(open_unit(z)));
      sincos_turn_lanes(w, c, s);
      v2 = r1 * c;
      v3 = r1 * s;
    }
    for (int l = 0; l < kLanes; ++l) {
      out[4 * l] = v0[l];
      out[4 * l + 1] = v1[l];
      out[4 * l + 2] = v2[l];
      out[4 * l + 3] = v3[l];
    }
  }
}
#endif  // FDSM_SIMD_STREAM

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
// ------------------------------------------------------------------------------------------------
// The same transcription in AVX2 intrinsics, for CPUs that have AVX2 when ATen's CPU capability
// (ATEN_CPU_CAPABILITY) allows it. Three things GCC's vector extensions do not give: mulhilo as two
// vpmuludq (GCC strength-reduces a 64-bit multiply by a constant into a dozen shifts and adds), the
// output's 4 x 8 transpose as shuffles instead of 32 scalar stores, and the sphere's fixed-point
// sum of squares (fd_math.h sphere_sq_fixed) taken from the registers, not from a second pass.
#define FDSM_AVX2_STREAM 1
#define FDSM_AVX2 __attribute__((target("avx2")))
#define FDSM_AVX2_LANE __attribute__((target("avx2"), always_inline)) inline

FDSM_AVX2_LANE void mulhilo8(__m256i m, __m256i a, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, ...: 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, ...
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

FDSM_AVX2_LANE __m256 splat(float f) { return _mm256_set1_ps(f); }

FDSM_AVX2_LANE __m256 open_unit8(__m256i b) {  // open_unit
  const __m256i k = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(b, 9), 1), _mm256_set1_epi32(1));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(k), splat(5.9604644775390625e-08f));
}

FDSM_AVX2_LANE __m256 log8(__m256 u) {  // portable_log
  const __m256i b = _mm256_castps_si256(u);
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(0xff)),
                               _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f800000)));
  const __m256 big = _mm256_cmp_ps(m, splat(1.41421356f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, splat(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // big is -1 where true
  const __m256 s = _mm256_div_ps(_mm256_sub_ps(m, splat(1.0f)), _mm256_add_ps(m, splat(1.0f)));
  const __m256 s2 = _mm256_mul_ps(s, s);
  __m256 p = _mm256_add_ps(_mm256_mul_ps(splat(0.0909090909f), s2), splat(0.111111111f));
  p = _mm256_add_ps(_mm256_mul_ps(p, s2), splat(0.142857143f));
  p = _mm256_add_ps(_mm256_mul_ps(p, s2), splat(0.2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, s2), splat(0.333333333f));
  p = _mm256_add_ps(_mm256_mul_ps(p, s2), splat(1.0f));
  return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(e), splat(0.693147181f)),
                       _mm256_mul_ps(_mm256_mul_ps(splat(2.0f), s), p));
}

FDSM_AVX2_LANE void sincos_turn8(__m256i b, __m256& c, __m256& s) {  // portable_sincos_turn
  const __m256 frac = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0x3fffffff))),
                                    splat(9.31322574615478515625e-10f));
  const __m256 phi = _mm256_mul_ps(_mm256_sub_ps(frac, splat(0.5f)), splat(1.57079632679f));
  const __m256 p2 = _mm256_mul_ps(phi, phi);
  __m256 sn = _mm256_sub_ps(_mm256_mul_ps(splat(2.75573192e-06f), p2), splat(1.98412698e-04f));
  sn = _mm256_add_ps(_mm256_mul_ps(sn, p2), splat(8.33333333e-03f));
  sn = _mm256_sub_ps(_mm256_mul_ps(sn, p2), splat(1.66666667e-01f));
  sn = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(sn, p2), phi), phi);
  __m256 cs = _mm256_add_ps(_mm256_mul_ps(splat(-2.75573192e-07f), p2), splat(2.48015873e-05f));
  cs = _mm256_sub_ps(_mm256_mul_ps(cs, p2), splat(1.38888889e-03f));
  cs = _mm256_add_ps(_mm256_mul_ps(cs, p2), splat(4.16666667e-02f));
  cs = _mm256_sub_ps(_mm256_mul_ps(cs, p2), splat(0.5f));
  cs = _mm256_add_ps(_mm256_mul_ps(cs, p2), splat(1.0f));
  const __m256 c45 = _mm256_mul_ps(_mm256_sub_ps(cs, sn), splat(0.707106781f));
  const __m256 s45 = _mm256_mul_ps(_mm256_add_ps(cs, sn), splat(0.707106781f));
  // Quadrant q = b >> 30: (c, s) = (c45, s45), (-s45, c45), (-c45, -s45), (s45, -c45): swap when bit 30
  // is set, negate c when q is 1 or 2 (bit 31 xor bit 30), negate s when q >= 2 (bit 31).
  const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(b, 1));  // blendv reads the top bit
  const __m256 a = _mm256_blendv_ps(c45, s45, swap), bb = _mm256_blendv_ps(s45, c45, swap);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i neg_c = _mm256_and_si256(_mm256_xor_si256(b, _mm256_slli_epi32(b, 1)), sign);
  const __m256i neg_s = _mm256_and_si256(b, sign);
  c = _mm256_xor_ps(a, _mm256_castsi256_ps(neg_c));
  s = _mm256_xor_ps(bb, _mm256_castsi256_ps(neg_s));
}

FDSM_AVX2_LANE __m256 rademacher8(__m256i b) {  // +1 where the top bit is set, else -1
  const __m256i sign = _mm256_andnot_si256(b, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  return _mm256_castsi256_ps(_mm256_or_si256(sign, _mm256_set1_epi32(0x3f800000)));
}

// fd_math.h sphere_sq_fixed of 8 floats, summed into 4 uint64 lanes, exactly. With E the biased
// exponent and m the 24-bit significand, raw = m * 2^(E - 150), so raw^2 * 2^F = (m * 2^7)^2 *
// 2^-(314 - F - 2 E): the integer square of the 31-bit m * 2^7 (vpmuludq) shifted right (the
// truncation) by bias - 2 E, bias = 314 - F, a count >= 0 since |raw| < 5.8 and F <= 56. Subnormals
// and zero (E = 0) get a count above 250, so 0, their exact truncation.
FDSM_AVX2_LANE __m256i add_sq_fixed8(__m256i acc, __m256 v, __m256i bias) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i count = _mm256_sub_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(b, 22), _mm256_set1_epi32(0x1fe)));
  const __m256i m = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi32(b, 7), _mm256_set1_epi32(0x3fffff80)),
                                    _mm256_set1_epi32(0x40000000));
  const __m256i m_odd = _mm256_srli_epi64(m, 32);
  const __m256i count_even = _mm256_and_si256(count, _mm256_set1_epi64x(0xffffffffll));
  const __m256i even = _mm256_srlv_epi64(_mm256_mul_epu32(m, m), count_even);
  const __m256i odd = _mm256_srlv_epi64(_mm256_mul_epu32(m_odd, m_odd), _mm256_srli_epi64(count, 32));
  return _mm256_add_epi64(acc, _mm256_add_epi64(even, odd));
}

// Per-call constants of blocks_avx2.
struct StreamConsts {
  __m256i m0, m1;              // the Philox multipliers
  __m256i key0[10], key1[10];  // the round keys, splat once (memory operands of the xors)
  __m256i x1, y1, w0k;         // round 0's per-row constants (see blocks_avx2)
  __m256i bias;                // add_sq_fixed8's shift bias, 314 - F
};

// U consecutive vectors of kLanes blocks from `group` (block numbers in lanes): 4 * kLanes * U values into
// out. The U Philox chains are independent and interleaved: one chain is latency-bound (a round is a
// multiply, a blend and two xors in series, ~8 cycles), U of them fill the vector pipes.
template <int U>
FDSM_AVX2_LANE void step_avx2(const StreamConsts& k, __m256i group, bool rademacher, bool sum, __m256i& acc,
                              float* out) {
  __m256i x[U], y[U], z[U], w[U];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    __m256i hi0, lo0;
    mulhilo8(k.m0, _mm256_add_epi32(group, _mm256_set1_epi32(kLanes * u)), hi0, lo0);
    x[u] = k.x1;
    y[u] = k.y1;
    z[u] = _mm256_xor_si256(hi0, k.w0k);
    w[u] = lo0;
  }
  for (int r = 1; r < 10; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      __m256i hi0, lo0, hi, lo;
      mulhilo8(k.m0, x[u], hi0, lo0);
      mulhilo8(k.m1, z[u], hi, lo);
      x[u] = _mm256_xor_si256(_mm256_xor_si256(hi, y[u]), k.key0[r]);
      y[u] = lo;
      z[u] = _mm256_xor_si256(_mm256_xor_si256(hi0, w[u]), k.key1[r]);
      w[u] = lo0;
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u, out += 4 * kLanes) {
    __m256 v0, v1, v2, v3;
    if (rademacher) {
      v0 = rademacher8(x[u]);
      v1 = rademacher8(y[u]);
      v2 = rademacher8(z[u]);
      v3 = rademacher8(w[u]);
    } else {  // box_muller4
      __m256 c, s;
      const __m256 r0 = _mm256_sqrt_ps(_mm256_mul_ps(splat(-2.0f), log8(open_unit8(x[u]))));
      sincos_turn8(y[u], c, s);
      v0 = _mm256_mul_ps(r0, c);
      v1 = _mm256_mul_ps(r0, s);
      const __m256 r1 = _mm256_sqrt_ps(_mm256_mul_ps(splat(-2.0f), log8(open_unit8(z[u]))));
      sincos_turn8(w[u], c, s);
      v2 = _mm256_mul_ps(r1, c);
      v3 = _mm256_mul_ps(r1, s);
    }
    if (sum) {
      acc = add_sq_fixed8(acc, v0, k.bias);
      acc = add_sq_fixed8(acc, v1, k.bias);
      acc = add_sq_fixed8(acc, v2, k.bias);
      acc = add_sq_fixed8(acc, v3, k.bias);
    }
    // Lane l of v_k is element 4 l + k: a 4 x 8 transpose.
    const __m256 t0 = _mm256_unpacklo_ps(v0, v1), t1 = _mm256_unpackhi_ps(v0, v1);
    const __m256 t2 = _mm256_unpacklo_ps(v2, v3), t3 = _mm256_unpackhi_ps(v2, v3);
    const __m256 b04 = _mm256_shuffle_ps(t0, t2, 0x44), b15 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 b26 = _mm256_shuffle_ps(t1, t3, 0x44), b37 = _mm256_shuffle_ps(t1, t3, 0xEE);
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(b04, b15, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(b26, b37, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(b04, b15, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(b26, b37, 0x31));
  }
}

// The per-call constants of the stream for `rows` (one row per lane, or one row in every lane).
FDSM_AVX2_LANE StreamConsts stream_consts(uint64_t seed, uint64_t offset, __m256i rows, int fraction_bits) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  StreamConsts k;
  k.m0 = _mm256_set1_epi32(static_cast<int>(kM0));
  k.m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t k0_first = k0, k1_first = k1;
  for (int r = 0; r < 10; ++r, k0 += 0x9E3779B9u, k1 += 0xBB67AE85u) {
    k.key0[r] = _mm256_set1_epi32(static_cast<int>(k0));
    k.key1[r] = _mm256_set1_epi32(static_cast<int>(k1));
  }
  // Round 0's product of z (the offset's low word) is the same for every block: its x and y outputs
  // are per row constants.
  uint32_t hi1, lo1;
  mulhilo32(kM1, static_cast<uint32_t>(offset), hi1, lo1);
  k.x1 = _mm256_xor_si256(rows, _mm256_set1_epi32(static_cast<int>(hi1 ^ k0_first)));
  k.y1 = _mm256_set1_epi32(static_cast<int>(lo1));
  k.w0k = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32) ^ k1_first));
  k.bias = _mm256_set1_epi32(314 - fraction_bits);
  return k;
}

// Rows of fewer than 4 kLanes elements, kLanes at a time: lane l runs the blocks of row row0 + l (the
// block number is the same in every lane). Row l's `groups` blocks go to out + l * stride.
FDSM_AVX2 void rows_avx2(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row0, int64_t groups, float* out,
                         int64_t stride) {
  const __m256i rows = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(row0))),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const StreamConsts k = stream_consts(seed, offset, rows, 0);
  __m256i unused = _mm256_setzero_si256();
  alignas(32) float block[4 * kLanes];
  for (int64_t g = 0; g < groups; ++g) {
    step_avx2<1>(k, _mm256_set1_epi32(static_cast<int>(g)), kind == kRademacher, false, unused, block);
    for (int l = 0; l < kLanes; ++l) std::memcpy(out + l * stride + 4 * g, block + 4 * l, 4 * sizeof(float));
  }
}

// blocks_simd in AVX2, with the sphere's fixed-point sum of squares of the values written (with
// 2^F = 2^fraction_bits) returned when `sum` is set, else 0.
FDSM_AVX2 uint64_t blocks_avx2(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row, uint64_t g0,
                               int64_t n_vec, float* out, bool sum, int fraction_bits) {
  const StreamConsts k =
      stream_consts(seed, offset, _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(row))), fraction_bits);
  const bool rademacher = kind == kRademacher;
  __m256i acc = _mm256_setzero_si256();
  __m256i group = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0))),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  constexpr int kInterleave = 2;
  int64_t v = 0;
  for (; v + kInterleave <= n_vec; v += kInterleave, out += 4 * kLanes * kInterleave) {
    step_avx2<kInterleave>(k, group, rademacher, sum, acc, out);
    group = _mm256_add_epi32(group, _mm256_set1_epi32(kLanes * kInterleave));
  }
  for (; v < n_vec; ++v, out += 4 * kLanes) {
    step_avx2<1>(k, group, rademacher, sum, acc, out);
    group = _mm256_add_epi32(group, _mm256_set1_epi32(kLanes));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}
#endif  // AVX2

#ifdef FDSM_AVX2_STREAM
// Rows shorter than one vector step (fewer than 4 kVectorLanes elements) would each run the scalar code.
// They are drawn kVectorLanes rows at a time instead, one row per lane, and kept: the kernels ask for
// their rows in order, so the next calls find theirs here. An entry is keyed by all its values depend
// on (the sphere and gaussian kinds share raw values); four entries, since a kernel may walk several row
// ranges at once (dsm_perturb: the noise row n B + i, then the direction rows k B + i).
constexpr int64_t kShortRow = 4 * kVectorLanes;  // values kept per row

struct ShortRows {
  bool valid = false, rademacher = false;
  uint64_t seed = 0, offset = 0, row0 = 0;
  int64_t groups = 0;
  alignas(32) float vals[kVectorLanes * kShortRow];
};

const float* short_row(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row, int64_t count) {
  thread_local ShortRows cache[4];
  thread_local int next = 0;
  const bool rademacher = kind == kRademacher;
  const int64_t groups = (count + 3) / 4;
  const uint64_t row0 = row & ~static_cast<uint64_t>(kVectorLanes - 1);
  for (const ShortRows& c : cache)
    if (c.valid && c.rademacher == rademacher && c.seed == seed && c.offset == offset && c.row0 == row0 &&
        c.groups >= groups)
      return c.vals + (row - row0) * kShortRow;
  ShortRows& c = cache[next];
  next = (next + 1) % 4;
  rows_avx2(kind, seed, offset, row0, groups, c.vals, kShortRow);
  c.valid = true;
  c.rademacher = rademacher;
  c.seed = seed;
  c.offset = offset;
  c.row0 = row0;
  c.groups = groups;
  return c.vals + (row - row0) * kShortRow;
}

// Whether the AVX2 path runs: the CPU has AVX2 and ATen's capability (ATEN_CPU_CAPABILITY, read once
// by ATen at start-up) is AVX2 or above, so ATEN_CPU_CAPABILITY=default tests the portable path.
bool avx2_allowed() {
  static const bool allowed = [] {
    const std::string cap = at::get_cpu_capability();
    return __builtin_cpu_supports("avx2") && (cap == "AVX2" || cap == "AVX512");
  }();
  return allowed;
}
#endif

// Elements [j0, j0 + count) of `row` into out; j0 a multiple of 4. Returns the fixed-point sum of
// squares of the values (2^F = 2^fraction_bits) when `sum` is set.
uint64_t draw(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row, int64_t j0, int64_t count, float* out,
              bool sum, int fraction_bits) {
  int64_t g = j0 / 4;
  const int64_t g_end = (j0 + count + 3) / 4;
  int64_t done = 0;  // elements written
  uint64_t total = 0;
  const double unit = exact_pow2(fraction_bits);  // 2^F
  [[maybe_unused]] bool vector = g_vector_stream.load(std::memory_order_relaxed);
  [[maybe_unused]] const int64_t n_vec = (count / 4) / kVectorLanes;
#ifdef FDSM_AVX2_STREAM
  if (vector && j0 == 0 && count > 0 && count < kShortRow && avx2_allowed()) {
    std::memcpy(out, short_row(kind, seed, offset, row, count), static_cast<size_t>(count) * sizeof(float));
    if (sum)
      for (int64_t j = 0; j < count; ++j) total += sphere_sq_fixed(out[j], unit);
    return total;
  }
  if (vector && n_vec > 0 && avx2_allowed()) {
    total = blocks_avx2(kind, seed, offset, row, static_cast<uint64_t>(g), n_vec, out, sum, fraction_bits);
    g += n_vec * kVectorLanes;
    done = n_vec * kVectorLanes * 4;
    vector = false;
  }
#endif
#ifdef FDSM_SIMD_STREAM
  if (vector && n_vec > 0) {
    blocks_simd(kind, seed, offset, row, static_cast<uint64_t>(g), n_vec, out);
    g += n_vec * kVectorLanes;
    done = n_vec * kVectorLanes * 4;
    if (sum)  // the portable path does not sum in registers: one pass over what it wrote (in L1)
      for (int64_t j = 0; j < done; ++j) total += sphere_sq_fixed(out[j], unit);
  }
#endif
  for (; g < g_end; ++g) {
    const F32x4 r = raw_direction4(kind, seed, offset, row, static_cast<uint64_t>(g));
    const int64_t lanes = count - done < 4 ? count - done : 4;
    std::memcpy(out + done, r.v, static_cast<size_t>(lanes) * sizeof(float));
    if (sum)
      for (int64_t l = 0; l < lanes; ++l) total += sphere_sq_fixed(r.v[l], unit);
    done += lanes;
  }
  return total;
}

}  // namespace

void raw_direction_values(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row, int64_t j0, int64_t count,
                          float* out) {
  draw(kind, seed, offset, row, j0, count, out, false, 0);
}

double direction_row(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row, int64_t d, double eps,
                     float* out) {
  const bool sphere = kind == kSphere;
  const uint64_t total = draw(kind, seed, offset, row, 0, d, out, sphere, sphere ? sphere_fraction_bits(d) : 0);
  return row_scale(kind, eps, d, sphere ? sphere_sum_sq(total, sphere_unit(d)) : 0.0);
}

bool set_vector_stream(bool enable) { return g_vector_stream.exchange(enable); }

}  // namespace fdsm
