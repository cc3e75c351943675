// The Hopper GEMM for bf16 activations (sm_90a only: see linear_hopper_gemm.cuh).
#include "linear_hopper_gemm.cuh"

namespace linquant::cuda::hopper {
LINQUANT_HOPPER_INSTANTIATE(BF16)
}  // namespace linquant::cuda::hopper
