// The direction stream of fd_math.h for the CPU kernels, many Philox blocks at a time.
#pragma once

#include <cstdint>

namespace fdsm {

// Raw direction values (fd_math.h raw_direction4: standard normals for the sphere and gaussian kinds,
// +-1 for rademacher) of elements [j0, j0 + count) of stream row `row` into out[0, count); j0 must be
// a multiple of 4. Bitwise the values of raw_direction4, computed 8 Philox blocks per instruction
// with GCC vector extensions (and AVX2 where the CPU has it); other compilers get the scalar loop.
void raw_direction_values(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row, int64_t j0, int64_t count,
                          float* out);

// The raw direction values of the whole stream row `row` (d elements) into out[0, d), and the row's
// scale (fd_math.h row_scale), so that v_j = out[j] * scale. For the sphere the row's sum of squares
// is fd_math.h's fixed-point sum, taken while the values are drawn.
double direction_row(int64_t kind, uint64_t seed, uint64_t offset, uint64_t row, int64_t d, double eps,
                     float* out);

// Test hook: false makes raw_direction_values use the scalar loop only; returns the old setting.
bool set_vector_stream(bool enable);

}  // namespace fdsm
