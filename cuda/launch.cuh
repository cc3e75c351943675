// Helpers shared by the CUDA kernel files: device checks, grid sizes, the fp32/fp16/bf16 storage
// type of a tensor, and the error flag the kernels raise for bad values.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>

#include "../csrc/core/float_convert.h"
#include "../csrc/quant_layout.h"

namespace linquant::cuda {

inline void check_cuda(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.is_cuda(), "linquant: ", name, " must be a CUDA tensor for this kernel, got ", t.device());
}

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than needed.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t want = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<int64_t>(want, 1, int64_t{1} << 20));
}

// A device attribute, asked once per device (ATen/cuda/CUDAContext.h's device properties would do,
// but they need the cuSPARSE and cuBLAS headers, which a bare nvcc install lacks).
template <cudaDeviceAttr ATTR>
int device_attribute(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> known{};  // value + 1; 0: not asked yet
  const int cached = known[device].load(std::memory_order_relaxed);
  if (cached != 0) return cached - 1;
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, ATTR, device));
  known[device].store(value + 1, std::memory_order_relaxed);
  return value;
}

// Streaming multiprocessors of a device.
inline int multiprocessors(c10::DeviceIndex device) {
  return device_attribute<cudaDevAttrMultiProcessorCount>(device);
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Calls fn with a null pointer of the torch-free storage type of dt (float, core::half_t or
// core::bf16_t), so kernels are instantiated once per floating dtype.
template <typename Fn>
void dispatch_float(at::ScalarType dt, Fn&& fn) {
  switch (dt) {
    case at::kHalf:
      fn(static_cast<core::half_t*>(nullptr));
      break;
    case at::kBFloat16:
      fn(static_cast<core::bf16_t*>(nullptr));
      break;
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      break;
    default:
      TORCH_CHECK_VALUE(false, "linquant: expected float32, float16 or bfloat16, got ", dt);
  }
}

// A zeroed device word the kernels set (atomicOr) when they meet a bad value; read back once
// after the launches (a host synchronization), however many launches an op makes.
class ErrorFlag {
 public:
  explicit ErrorFlag(const at::Tensor& like) : flag_(at::zeros({1}, like.options().dtype(at::kInt))) {}
  unsigned* ptr() { return reinterpret_cast<unsigned*>(flag_.data_ptr<int32_t>()); }
  // The flags raised so far (synchronizes with the stream).
  int32_t value() const { return flag_.item<int32_t>(); }

 private:
  at::Tensor flag_;
};

}  // namespace linquant::cuda
