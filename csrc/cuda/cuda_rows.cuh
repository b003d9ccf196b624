// Launch geometry and reductions shared by the CUDA kernels: per-row work is done by a "row group" of
// G threads, a warp (G = 32, several rows per block) for short rows or the whole block (G = 256) for
// long ones; sums over a row are tree-reduced inside the group. Grids are grid-stride loops with
// 64-bit indices.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../fd_common.h"
#include "../fd_math.h"

namespace fdsm {
namespace cuda {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(65535) * 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the row group; every thread of the group gets the total and must call it
// (control flow is uniform over a group: row loops depend only on the group's index).
template <int G, typename T>
__device__ __forceinline__ T group_sum(T v) {
  v = warp_sum(v);
  if constexpr (G == 32) {
    return v;
  } else {
    static_assert(G == kThreads, "a row group is a warp or the whole block");
    __shared__ T partial[kThreads / 32];
    __syncthreads();  // the previous call's readers are done with `partial`
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    T total = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
    return total;
  }
}

template <int G>
struct RowGroup {
  static constexpr int kPerBlock = kThreads / G;
  __device__ static int64_t first() { return int64_t(blockIdx.x) * kPerBlock + threadIdx.x / G; }
  __device__ static int64_t stride() { return int64_t(gridDim.x) * kPerBlock; }
  __device__ static int lane() { return threadIdx.x % G; }
};

// The sphere's row sum of squares of the raw normals (0 for the other kinds): fd_math.h's exact
// fixed-point sum, so the butterfly order gives the CPU's bits.
template <int G>
__device__ double row_sum_sq(int64_t kind, uint64_t seed, uint64_t off, int64_t row, int64_t d) {
  if (kind != kSphere) return 0.0;
  const double unit = sphere_unit(d);
  unsigned long long s = 0;
  const int64_t groups = (d + 3) / 4;
  for (int64_t g = RowGroup<G>::lane(); g < groups; g += G) {
    const F32x4 z = raw_direction4(kind, seed, off, row, g);
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (g * 4 + l < d) s += static_cast<unsigned long long>(sphere_sq_fixed(z.v[l], unit));
  }
  return sphere_sum_sq(static_cast<uint64_t>(group_sum<G>(s)), unit);
}

inline int64_t row_blocks(int64_t rows, int G) {
  const int64_t per_block = kThreads / G;
  return std::max<int64_t>(1, std::min<int64_t>((rows + per_block - 1) / per_block, kMaxBlocks));
}

inline int64_t elem_blocks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

// Calls launch(std::integral_constant<int, G>{}) with the row-group size for rows of d features.
template <typename F>
inline void with_row_group(int64_t d, F&& launch) {
  if (d <= 512)
    launch(std::integral_constant<int, 32>{});
  else
    launch(std::integral_constant<int, kThreads>{});
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda
}  // namespace fdsm
