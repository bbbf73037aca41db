// The one CUDA source that may include c10/cuda and ATen/cuda headers (compiled only in CUDA builds by
// the host compiler): the current stream for the kernels, and the host-side CUDA ops.
#include <c10/cuda/CUDAStream.h>

#include "cuda/common.cuh"
#include "cuda/layout_cuda.h"
#include "segments.h"

namespace mta_kernels {
namespace cuda {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// O(B) greedy packing: runs on the host (one copy of cu_units there, one of the [W, 4] list back),
// so that the CPU and CUDA work lists are the same by construction.
at::Tensor block_diagonal_work_list(const at::Tensor& cu_units, int64_t block_m) {
  return cpu::block_diagonal_work_list(cu_units, block_m);
}

}  // namespace cuda
}  // namespace mta_kernels
