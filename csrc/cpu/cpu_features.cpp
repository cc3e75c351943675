#include "cpu_features.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace linquant::cpu {
namespace {

CpuIsa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return CpuIsa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return CpuIsa::avx2;
  }
#endif
  return CpuIsa::baseline;
}

CpuIsa choose() {
  const CpuIsa best = detect();
  const char* want = std::getenv("LINQUANT_CPU_ISA");
  if (want == nullptr) return best;
  for (CpuIsa isa : {CpuIsa::baseline, CpuIsa::avx2, CpuIsa::avx512}) {
    // An override can only narrow: asking for more than the CPU has keeps what it has.
    if (std::strcmp(want, cpu_isa_name(isa)) == 0) return isa <= best ? isa : best;
  }
  // A misspelt name would otherwise run the best variant while the caller believes it narrowed it.
  TORCH_CHECK_VALUE(false, "linquant: LINQUANT_CPU_ISA must be baseline, avx2 or avx512 (or unset), got '", want,
                    "'");
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512:
      return "avx512";
    case CpuIsa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = choose();
  return isa;
}

std::string cpu_isa_in_use() { return cpu_isa_name(cpu_isa()); }

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = cpu_isa() == CpuIsa::avx512 && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace linquant::cpu

// No tensor arguments: the kernel that runs for an empty dispatch key set.
TORCH_LIBRARY_IMPL(linquant, CompositeExplicitAutograd, m) { m.impl("_cpu_isa", &linquant::cpu::cpu_isa_in_use); }
