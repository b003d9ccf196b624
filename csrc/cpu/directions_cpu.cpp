// Lane-parallel transcription of fd_math.h's direction stream (Philox4x32-10, then the portable
// Box-Muller). Each vector lane runs one Philox block through exactly the scalar code's operations in
// the same order -- integer ops, and IEEE +, -, *, /, sqrt, int->float, none contracted into an FMA
// (-ffp-contract=off) -- so the values are bitwise those of raw_direction4 (tests/test_ops.py checks
// this against the pure-torch Philox). Branches of the scalar code become lane selects.
#include "directions_cpu.h"

// The lane helpers below pass 32-byte vectors by value; they are always inlined, so no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <atomic>
#include <cstring>

#include "../fd_math.h"

namespace fdsm {
namespace {

std::atomic<bool> g_vector_stream{true};

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
#define FDSM_SIMD_STREAM 1
#define FDSM_LANE __attribute__((always_inline)) inline

constexpr int kLanes = 8;  // Philox blocks per vector: 8 x 32 bits, one AVX2 register
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

// kLanes consecutive blocks from block g0 of `row`: 4 * kLanes values into out.
#if defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
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
#endif

}  // namespace

void raw_direction_values(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row, int64_t j0, int64_t count,
                          float* out) {
  int64_t g = j0 / 4;
  const int64_t g_end = (j0 + count + 3) / 4;
  int64_t done = 0;  // elements written
#ifdef FDSM_SIMD_STREAM
  const int64_t n_vec = g_vector_stream.load(std::memory_order_relaxed) ? (count / 4) / kLanes : 0;
  if (n_vec > 0) {
    blocks_simd(kind, seed, offset, row, static_cast<uint64_t>(g), n_vec, out);
    g += n_vec * kLanes;
    done = n_vec * kLanes * 4;
  }
#endif
  for (; g < g_end; ++g) {
    const F32x4 r = raw_direction4(kind, seed, offset, row, static_cast<uint64_t>(g));
    const int64_t lanes = count - done < 4 ? count - done : 4;
    std::memcpy(out + done, r.v, static_cast<size_t>(lanes) * sizeof(float));
    done += lanes;
  }
}

bool set_vector_stream(bool enable) { return g_vector_stream.exchange(enable); }

}  // namespace fdsm
