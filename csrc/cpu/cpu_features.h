// Which instruction-set variant of the CPU kernels to run, decided once at run time from the CPU's
// features (not the build machine's). LINQUANT_CPU_ISA=baseline|avx2|avx512 narrows the choice,
// which is how the tests exercise every variant on one machine.
#pragma once

namespace linquant::cpu {

enum class CpuIsa { baseline = 0, avx2 = 1, avx512 = 2 };

CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace linquant::cpu
