// Op schemas, written once, and each op's argument checks as an op of its own. Each device registers
// its kernels in its own file (cpu/*.cpp, cuda/*.cu); the Triton kernels are registered from Python
// under the same schemas (fdsm_ext/triton/). Fake (meta) kernels and the backward ops' autograd (double
// backward) are registered from Python in fdsm_ext/ops.py for both namespaces; the forward FD ops'
// autograd kernels are in fd_autograd.cpp (both namespaces); the Langevin step's autograd kernel,
// which only refuses inputs that need a gradient, is in langevin_autograd.cpp.
#include <Python.h>
#include <torch/library.h>

#include <atomic>

#include "cpu/directions_cpu.h"
#include "fd_common.h"

namespace fdsm {
namespace {
std::atomic<bool> g_poison{false};
bool set_poison_outputs(bool enable) { return g_poison.exchange(enable); }
}  // namespace
bool poison_outputs_enabled() { return g_poison.load(std::memory_order_relaxed); }
}  // namespace fdsm

// `_C` is imported for its side effect: loading this library registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// FD_OP(name, args, returns) defines the op and `_check_<name>(args) -> ()`, which runs the op's
// argument checks (fd_common.h check_<name>) on tensors of any device: the Triton kernels call it, so
// that every backend rejects bad input with the same messages.
#define FD_OP(NAME, ARGS, RETURNS)               \
  m.def(#NAME "(" ARGS ") -> " RETURNS);         \
  m.def("_check_" #NAME "(" ARGS ") -> ()", &fdsm::check_##NAME)

TORCH_LIBRARY(fdsm_ext, m) {
  // Stacked batch [x; x+v_1..x+v_n; x-v_1..x-v_n] (the x block only when
  // include_center): x is (B, d), the result ((include_center + 2n) B, d);
  // row k*B+i of each +-block uses direction row k*B+i of the Philox stream.
  FD_OP(perturb, "Tensor x, Tensor seed, float eps, int n_slices, int kind, bool include_center", "Tensor");
  // Per-sample FD-SSM loss, mean over slices: f0 (B,), fp and fm (n, B).
  FD_OP(fd_ssm_quotient, "Tensor f0, Tensor fp, Tensor fm, float eps, float dim_scale", "Tensor");
  FD_OP(fd_ssm_quotient_backward, "Tensor grad, Tensor f0, Tensor fp, Tensor fm, float eps, float dim_scale",
        "(Tensor, Tensor, Tensor)");
  // Per-sample FD-SSM-VR loss: sp = s(x+v), sm = s(x-v), both (n, B, d); v regenerated from seed.
  FD_OP(fd_ssm_vr, "Tensor sp, Tensor sm, Tensor seed, float eps, int kind, float dim_scale", "Tensor");
  FD_OP(fd_ssm_vr_backward, "Tensor grad, Tensor sp, Tensor sm, Tensor seed, float eps, int kind, float dim_scale",
        "(Tensor, Tensor)");
  // Per-sample FD-DSM loss: fp, fm (n, B) at x~ +- v, noise = x~ - x (B, d), sigma (B,).
  FD_OP(fd_dsm_quotient,
        "Tensor fp, Tensor fm, Tensor noise, Tensor sigma, Tensor seed, float eps, int kind, float dim_scale",
        "Tensor");
  FD_OP(fd_dsm_quotient_backward,
        "Tensor grad, Tensor fp, Tensor fm, Tensor noise, Tensor sigma, Tensor seed, float eps, int kind, "
        "float dim_scale",
        "(Tensor, Tensor)");
  // Gradient w.r.t. noise, a separate op since noise rarely requires grad.
  FD_OP(fd_dsm_noise_backward,
        "Tensor grad, Tensor fp, Tensor fm, Tensor noise, Tensor sigma, Tensor seed, float eps, int kind, "
        "float dim_scale",
        "Tensor");
  // Order-T stencil: rows t*B+i hold x_i + (T - 2t) eps v_i, t = 0..T.
  FD_OP(stencil_perturb, "Tensor x, Tensor v, float eps, int order", "Tensor");
  FD_OP(stencil_perturb_backward, "Tensor grad, float eps, int order", "(Tensor, Tensor)");
  // (2 eps)^-T sum_t (-1)^t C(T, t) f[t]: f is (T+1, B), the result (B,).
  FD_OP(stencil_combine, "Tensor f, float eps, int order", "Tensor");
  FD_OP(stencil_combine_backward, "Tensor grad, Tensor f, float eps, int order", "Tensor");
  // Langevin step (docs/math.md "Langevin dynamics"), one pass: x_new = clamp(x + alpha_i s + b_i z) with
  // b = noise_scale, or b = sqrt(2 alpha_i) when noise_scale is None (the VE predictor passes
  // alpha = delta, noise_scale = sqrt(delta); noise_scale is last, with a default, so that callers of
  // the plain step need not name it). x and score are (B, *event) of one dtype; alpha and noise_scale
  // are (B,) or one element, any float dtype, on x's device (tensors, not floats, so that a captured
  // CUDA graph can change them between replays).
  // z is the gaussian Philox stream: element j of sample i is lane j & 3 of block (j >> 2, i, offset)
  // under key seed. seed is the int64 (seed, offset) pair, on the CPU or on x's device; a device seed
  // is read by the kernel at run time (CUDA-graph replay sees updates to it). The clamp bounds are
  // optional (NaN passes through). norms is (3, B) = (||s||, ||z||, ||x_new||) per sample in the loss
  // dtype when return_norms, else (3, 0). The in-place form writes x_new into x and returns norms; x
  // must not overlap score, alpha, seed or noise_scale in memory.
  FD_OP(langevin_step,
        "Tensor x, Tensor score, Tensor alpha, Tensor seed, float? clamp_min, float? clamp_max, bool return_norms, "
        "Tensor? noise_scale=None",
        "(Tensor, Tensor)");
  m.def("langevin_step_(Tensor(a!) x, Tensor score, Tensor alpha, Tensor seed, float? clamp_min, float? clamp_max, "
        "bool return_norms, Tensor? noise_scale=None) -> Tensor");
  m.def("_check_langevin_step_(Tensor x, Tensor score, Tensor alpha, Tensor seed, float? clamp_min, float? clamp_max, "
        "bool return_norms, Tensor? noise_scale=None) -> ()",
        &fdsm::check_langevin_step_);
  // Test hook: NaN-fill every new output before the kernel writes it; returns the old setting.
  m.def("_set_poison_outputs(bool enable) -> bool", &fdsm::set_poison_outputs);
  // Test hook: false makes the CPU kernels draw directions with the scalar code only (not the
  // vectorised one of cpu/directions_cpu.cpp); returns the old setting.
  m.def("_set_vector_stream(bool enable) -> bool", &fdsm::set_vector_stream);
}
