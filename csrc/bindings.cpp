#include <omp.h>

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
#if defined(__AVX512F__)
  info["simd"] = "avx512";
#elif defined(__AVX2__)
  info["simd"] = "avx2";
#else
  info["simd"] = "baseline";
#endif
  return info;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "e3kernels C++ CPU kernels (OpenMP)";
  m.def("build_info", &build_info, "Compiler, SIMD level, OpenMP threads and torch version of this build.");
  for (auto reg : e3::registrars()) reg(m);
}
