#include "quantize_kernels.h"

#include "cpu_features.h"

namespace linquant::cpu {

const QuantizeKernels& quantize_kernels() {
#if !defined(__x86_64__)
  return quantize_kernels_baseline();
#else
  switch (cpu_isa()) {
    case CpuIsa::avx512:
      return quantize_kernels_avx512();
    case CpuIsa::avx2:
      return quantize_kernels_avx2();
    default:
      return quantize_kernels_baseline();
  }
#endif
}

}  // namespace linquant::cpu
