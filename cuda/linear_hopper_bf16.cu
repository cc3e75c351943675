// The Hopper GEMM for bf16 activations (sm_90a only: see linear_hopper_gemm.cuh).
#include "linear_hopper_gemm.cuh"

namespace linquant::cuda::hopper {
template size_t workspace_bytes<BF16>(const GemmArgs& a);
template bool gemm<BF16>(const GemmArgs& a, void* workspace, cudaStream_t stream);
}  // namespace linquant::cuda::hopper
