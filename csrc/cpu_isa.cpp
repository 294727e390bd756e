#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "registry.h"

namespace e3 {
namespace {

Isa parse_isa(const std::string& name, const char* what) {
  if (name == "baseline") return Isa::kBaseline;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  throw std::invalid_argument(std::string(what) + " = '" + name +
                              "' is not a CPU ISA level: use baseline, avx2 or avx512");
}

Isa detect() {
#if defined(E3_MULTI_ISA) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 state (XCR0).
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512cd");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  if (avx512 && avx2) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

std::mutex g_mu;
std::atomic<int> g_active{-1};  // -1: not chosen yet
std::string g_note;

void choose_locked() {
  if (g_active.load() >= 0) return;
  const Isa cpu = cpu_max_isa();
  Isa isa = cpu;
  const char* env = std::getenv("E3_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const Isa want = parse_isa(env, "E3_CPU_ISA");
    if (static_cast<int>(want) > static_cast<int>(cpu)) {
      g_note = std::string("E3_CPU_ISA=") + env + " is above this CPU's (or build's) " +
               isa_name(cpu) + ": using " + isa_name(cpu);
    } else {
      isa = want;
      if (want != cpu) g_note = std::string("lowered by E3_CPU_ISA=") + env;
    }
  }
  g_active.store(static_cast<int>(isa));
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

Isa cpu_max_isa() {
  static const Isa isa = detect();
  return isa;
}

std::vector<std::string> built_isas() {
#if defined(E3_MULTI_ISA)
  return {"baseline", "avx2", "avx512"};
#else
  return {"baseline"};
#endif
}

Isa active_isa() {
  const int a = g_active.load(std::memory_order_acquire);
  if (a >= 0) return static_cast<Isa>(a);
  std::lock_guard<std::mutex> lock(g_mu);
  choose_locked();
  return static_cast<Isa>(g_active.load());
}

std::string isa_note() {
  active_isa();
  std::lock_guard<std::mutex> lock(g_mu);
  return g_note;
}

std::string set_cpu_isa(const std::string& name) {
  const Isa want = parse_isa(name, "isa");
  const Isa cpu = cpu_max_isa();
  if (static_cast<int>(want) > static_cast<int>(cpu)) {
    throw std::invalid_argument("isa '" + name + "' is above what this CPU (or build) supports: " +
                                isa_name(cpu));
  }
  const std::string prev = isa_name(active_isa());
  std::lock_guard<std::mutex> lock(g_mu);
  g_note = want == cpu ? "" : "lowered by set_cpu_isa('" + name + "')";
  g_active.store(static_cast<int>(want));
  return prev;
}

namespace {
void register_cpu_isa(pybind11::module_& m) {
  m.def("set_cpu_isa", &set_cpu_isa,
        "Run the multi-ISA kernels at this level ('baseline', 'avx2', 'avx512'; at most the "
        "CPU's). Returns the previous level. Process-wide; E3_CPU_ISA sets the initial level.",
        pybind11::arg("isa"));
}
}  // namespace

E3_REGISTER(register_cpu_isa);

}  // namespace e3
