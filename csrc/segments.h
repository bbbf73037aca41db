#pragma once
#include <torch/types.h>

namespace mta_kernels {
namespace cpu {
at::Tensor offsets_from_lengths(const at::Tensor& lengths);
}  // namespace cpu
}  // namespace mta_kernels
