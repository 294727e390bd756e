// Each csrc/*.cpp registers its bindings here, so adding a kernel file never edits
// bindings.cpp:   E3_REGISTER(register_my_ops)   with   void register_my_ops(pybind11::module_&)
// (pybind helpers); the ops themselves are dispatcher ops: TORCH_LIBRARY_FRAGMENT(e3kernels, m)
// for the schemas and TORCH_LIBRARY_IMPL(e3kernels, CPU, m) for the kernels, in the same file.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace e3 {
using Registrar = void (*)(pybind11::module_&);
std::vector<Registrar>& registrars();
struct RegisterOps {
  explicit RegisterOps(Registrar r) { registrars().push_back(r); }
};
}  // namespace e3

#define E3_REGISTER(fn) static ::e3::RegisterOps e3_register_##fn(fn)
