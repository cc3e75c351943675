// Which instruction-set variant of the CPU kernels to run, decided once at run time from the CPU's
// features (not the build machine's). LINQUANT_CPU_ISA=baseline|avx2|avx512 narrows the choice,
// which is how the tests exercise every variant on one machine.
#pragma once

#include <string>

namespace linquant::cpu {

enum class CpuIsa { baseline = 0, avx2 = 1, avx512 = 2 };

// The variant in use; an unknown LINQUANT_CPU_ISA is an error (c10::ValueError) on every call.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);
std::string cpu_isa_in_use();  // cpu_isa_name(cpu_isa()), the _cpu_isa op
// Whether the AVX-512 kernels may use AVX512-BF16 dot products (vdpbf16ps): the CPU has them and
// the AVX-512 variant runs.
bool cpu_has_avx512_bf16();

}  // namespace linquant::cpu

// In a per-ISA file: the name `fn_<isa>` of the table getter this compilation defines.
#define LINQUANT_ISA_CAT2(a, b) a##b
#define LINQUANT_ISA_CAT(a, b) LINQUANT_ISA_CAT2(a, b)
#define LINQUANT_ISA_NAME(fn) LINQUANT_ISA_CAT(fn##_, LINQUANT_CPU_ISA)

// The kernel table `fn_<isa>()` of the chosen instruction set; only x86-64 builds the AVX copies.
#if defined(__x86_64__)
#define LINQUANT_PICK_ISA(fn)                                                     \
  (::linquant::cpu::cpu_isa() == ::linquant::cpu::CpuIsa::avx512 ? fn##_avx512() \
   : ::linquant::cpu::cpu_isa() == ::linquant::cpu::CpuIsa::avx2 ? fn##_avx2()   \
                                                                 : fn##_baseline())
#else
#define LINQUANT_PICK_ISA(fn) fn##_baseline()
#endif
