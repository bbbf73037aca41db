// CUDA implementations of the layout ops (registered in csrc/mta_kernels.cpp under WITH_CUDA).
// A plain header: no c10/cuda or ATen/cuda includes, so the .cu files compile against any torch.
#pragma once
#include <torch/types.h>

namespace mta_kernels {
namespace cuda {
void validate_layout(const at::Tensor& ranges, const at::Tensor& cu_units, int64_t num_tokens, int64_t seq_len);
at::Tensor token_to_unit(const at::Tensor& ranges, int64_t num_tokens);
at::Tensor unit_to_seq(const at::Tensor& cu_units, std::optional<int64_t> num_units);
at::Tensor offsets_from_lengths(const at::Tensor& lengths);
at::Tensor block_diagonal_work_list(const at::Tensor& cu_units, int64_t block_m);
}  // namespace cuda
}  // namespace mta_kernels
