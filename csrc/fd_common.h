// Host-side helpers shared by every device's op implementations: argument
// checks, the seed tensor, output allocation (NaN-poisoned on request so that
// tests catch any element a kernel forgets to write) and dtype rules.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace fdsm {

// Whether freshly allocated outputs are filled with NaN before a kernel writes
// them. Off by default (it costs a pass over memory); the test suite turns it on.
bool poison_outputs_enabled();

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor out = at::empty(sizes, opts);
  if (poison_outputs_enabled()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// Losses of half/bfloat16 inputs are returned in float32: the FD quotient
// cancels digits, and the value is accumulated in float32 anyway.
inline at::ScalarType loss_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// The (seed, offset) pair: an int64 tensor of two elements, on the CPU.
inline std::pair<uint64_t, uint64_t> read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 && seed.device().is_cpu(),
              "fdsm_ext: `seed` must be a CPU int64 tensor holding (seed, offset), got ",
              seed.scalar_type(), " of ", seed.numel(), " element(s) on ", seed.device());
  const at::Tensor s = seed.contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  return {static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1])};
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fdsm_ext: `", name,
              "` must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, "fdsm_ext: `eps` must be finite and > 0, got ", eps);
}

inline void check_kind(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "fdsm_ext: direction `kind` must be 0 (sphere), 1 (rademacher) or 2 (gaussian), got ", kind);
}

inline void check_same(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "fdsm_ext: `", na, "` is on ", a.device(), " but `", nb, "` is on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fdsm_ext: `", na, "` is ", a.scalar_type(), " but `", nb, "` is ", b.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "fdsm_ext: `", name, "` must have shape ", expected, ", got ", t.sizes());
}

}  // namespace fdsm
