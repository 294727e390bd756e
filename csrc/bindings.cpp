#include <omp.h>

#include "cpu_isa.h"
#include "registry.h"

namespace e3 {
std::vector<Registrar>& registrars() {
  static std::vector<Registrar> all;
  return all;
}
}  // namespace e3

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
  info["openmp_max_threads"] = omp_get_max_threads();
  info["torch_version"] = TORCH_VERSION;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#endif
  // The CPU ISA level the multi-ISA kernels run at (chosen at run time from CPUID).
  info["isa"] = e3::isa_name(e3::active_isa());
  info["isa_cpu"] = e3::isa_name(e3::cpu_max_isa());
  info["isa_built"] = e3::built_isas();
  const std::string note = e3::isa_note();
  if (!note.empty()) info["isa_note"] = note;
  return info;
}
}  // namespace

// The dispatcher namespace torch.ops.e3kernels: each kernel file adds its schemas with
// TORCH_LIBRARY_FRAGMENT(e3kernels, m) and its CPU kernels with TORCH_LIBRARY_IMPL, so they
// are registered when this module is imported (docs/dispatcher_ops.md).
TORCH_LIBRARY(e3kernels, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "e3kernels C++ CPU kernels (OpenMP)";
  m.def("build_info", &build_info,
        "Compiler, torch version, OpenMP threads, and the CPU ISA level chosen at run time "
        "(isa), the CPU's highest (isa_cpu) and the levels built (isa_built).");
  for (auto reg : e3::registrars()) reg(m);
}
