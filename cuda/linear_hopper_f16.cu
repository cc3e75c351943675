// The Hopper GEMM for fp16 activations (sm_90a only: see linear_hopper_gemm.cuh).
#include "linear_hopper_gemm.cuh"

namespace linquant::cuda::hopper {
LINQUANT_HOPPER_INSTANTIATE(F16)
}  // namespace linquant::cuda::hopper
