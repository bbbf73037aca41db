// CUDA validate_layout: one kernel checks every cu_units entry and every unit (the checks of
// layout_checks.h, shared with the CPU) and keeps the smallest error key with atomicMin; a one-thread
// kernel gathers what the message needs; one device-to-host copy brings the report back (a sync).
#include <c10/core/DeviceGuard.h>
#include <torch/types.h>

#include "cuda/common.cuh"
#include "cuda/layout_cuda.h"
#include "layout_checks.h"
#include "segments.h"

namespace mta_kernels {
namespace cuda {

using namespace layout;

namespace {

constexpr int kThreads = 256;

// info: int64 [kInfoSize], info[kInfoCuKey] = info[kInfoUnitKey] = kNoError on entry.
__global__ void find_first_error_kernel(const int32_t* __restrict__ ranges, const int32_t* __restrict__ cu,
                                        int64_t num_units, int64_t num_seqs, int64_t seq_len, int64_t num_tokens,
                                        int64_t* info) {
  auto* keys = reinterpret_cast<unsigned long long*>(info);
  const int64_t count = num_units > num_seqs + 1 ? num_units : num_seqs + 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    if (i <= num_seqs) {
      const int64_t code = check_cu_entry(cu, i, num_seqs, num_units);
      if (code) atomicMin(keys + kInfoCuKey, static_cast<unsigned long long>(i * kNumCodes + code));
    }
    if (i < num_units && num_seqs > 0) {
      const int64_t b = seq_of_unit(cu, num_seqs, i);
      const int64_t code = check_unit(ranges, cu, i, b, seq_len, num_tokens);
      if (code) atomicMin(keys + kInfoUnitKey, static_cast<unsigned long long>(i * kNumCodes + code));
    }
  }
}

__global__ void fill_info_kernel(const int32_t* __restrict__ ranges, const int32_t* __restrict__ cu,
                                 int64_t num_seqs, int64_t* info) {
  fill_info(info, ranges, cu, num_seqs);
}

}  // namespace

void validate_layout(const at::Tensor& ranges, const at::Tensor& cu_units, int64_t num_tokens, int64_t seq_len) {
  check_layout_metadata(ranges, cu_units, num_tokens, seq_len);
  const c10::DeviceGuard guard(ranges.device());
  const auto r = ranges.contiguous();
  const auto cu = cu_units.contiguous();
  const int64_t num_units = r.size(0), num_seqs = cu.numel() - 1;
  auto info = at::zeros({kInfoSize}, r.options().dtype(at::kLong));
  info.slice(0, kInfoCuKey, kInfoCuKey + 1).fill_(kNoError);
  info.slice(0, kInfoUnitKey, kInfoUnitKey + 1).fill_(kNoError);
  const cudaStream_t stream = current_stream();
  const int64_t count = std::max(num_units, num_seqs + 1);
  find_first_error_kernel<<<grid_for(count, kThreads), kThreads, 0, stream>>>(
      r.data_ptr<int32_t>(), cu.data_ptr<int32_t>(), num_units, num_seqs, seq_len, num_tokens,
      info.data_ptr<int64_t>());
  check_launch("validate_layout");
  fill_info_kernel<<<1, 1, 0, stream>>>(r.data_ptr<int32_t>(), cu.data_ptr<int32_t>(), num_seqs,
                                        info.data_ptr<int64_t>());
  check_launch("validate_layout");
  const auto host = info.to(at::kCPU);  // the one device-to-host copy
  raise_layout_error(host.data_ptr<int64_t>(), num_units, num_seqs, num_tokens, seq_len);
}

}  // namespace cuda
}  // namespace mta_kernels
