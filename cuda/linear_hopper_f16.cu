// The Hopper GEMM for fp16 activations (sm_90a only: see linear_hopper_gemm.cuh).
#include "linear_hopper_gemm.cuh"

namespace linquant::cuda::hopper {
template size_t workspace_bytes<F16>(const GemmArgs& a);
template bool gemm<F16>(const GemmArgs& a, void* workspace, cudaStream_t stream);
}  // namespace linquant::cuda::hopper
