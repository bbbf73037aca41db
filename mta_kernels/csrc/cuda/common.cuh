// Helpers shared by the .cu files: the current stream (defined in glue.cpp, which may include
// c10/cuda), a launch check and a grid size. Only plain CUDA and torch/types.h headers here.
#pragma once
#include <cuda_runtime.h>
#include <torch/types.h>

#include <algorithm>

namespace mta_kernels {
namespace cuda {

// torch's current CUDA stream on the current device (c10::cuda::getCurrentCUDAStream()).
cudaStream_t current_stream();

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Blocks for a grid-stride loop over n items (at least 1, at most 65535 * 16).
inline unsigned int grid_for(int64_t n, int threads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 1 << 20)));
}

}  // namespace cuda
}  // namespace mta_kernels
