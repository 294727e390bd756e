// Run-time choice of the CPU ISA level of the kernels compiled for several levels.
//   baseline: any x86-64 (SSE2) or any other CPU;  avx2: AVX2 + FMA + F16C + BMI2;
//   avx512: AVX-512 F/BW/DQ/VL/CD.
// The level in use is the highest the CPU (and OS) supports and this build has, lowered by
// the environment variable E3_CPU_ISA (read once, at first use) or set_cpu_isa().
#pragma once
#include <string>
#include <vector>

namespace e3 {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
Isa active_isa();                        // the level the kernels run at now
Isa cpu_max_isa();                       // the highest level this CPU supports (and is built)
std::vector<std::string> built_isas();   // the levels compiled into this build
std::string isa_note();                  // why the level is below the CPU's ("" when it is not)
// Sets the level ("baseline" | "avx2" | "avx512"); above cpu_max_isa() throws. Returns the
// previous level's name.
std::string set_cpu_isa(const std::string& name);

}  // namespace e3
