// Each csrc/*.cpp registers its bindings here, so adding a kernel file never edits
// bindings.cpp:   E3_REGISTER(register_my_ops)   with   void register_my_ops(pybind11::module_&)
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
