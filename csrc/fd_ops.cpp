// The fdsm_ext library: every op of fd_common.h's FDSM_OPS list (the schemas, written once next to each
// op's argument checks), and each op's argument checks as an op of its own. Each device registers its
// kernels in its own file (cpu/*.cpp, cuda/*.cu); the Triton kernels are registered from Python under
// the same schemas (fdsm_ext/triton/). Fake (meta) kernels and the backward ops' autograd (double
// backward) are registered from Python in fdsm_ext/ops.py for both namespaces; the loss ops' first-order
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

// Each op of fd_common.h's FDSM_OPS list, and `_check_<name>(args) -> ()`, which runs the op's argument
// checks (fd_common.h check_<name>) on tensors of any device: the Triton kernels call it, so that every
// backend rejects bad input with the same messages.
#define FD_OP(NAME, ARGS, RETURNS)       \
  m.def(#NAME "(" ARGS ") -> " RETURNS); \
  m.def("_check_" #NAME "(" ARGS ") -> ()", &fdsm::check_##NAME);
// An op that writes an argument: its check's schema has no alias annotation (it writes nothing).
#define FD_INPLACE_OP(NAME, ARGS, CHECK_ARGS, RETURNS) \
  m.def(#NAME "(" ARGS ") -> " RETURNS);               \
  m.def("_check_" #NAME "(" CHECK_ARGS ") -> ()", &fdsm::check_##NAME);

TORCH_LIBRARY(fdsm_ext, m) {
  FDSM_OPS(FD_OP, FD_INPLACE_OP)
  // Test hook: NaN-fill every new output before the kernel writes it; returns the old setting.
  m.def("_set_poison_outputs(bool enable) -> bool", &fdsm::set_poison_outputs);
  // Test hook: false makes the CPU kernels draw directions with the scalar code only (not the
  // vectorised one of cpu/directions_cpu.cpp); returns the old setting.
  m.def("_set_vector_stream(bool enable) -> bool", &fdsm::set_vector_stream);
}
