// CUDA implementations of the layout ops (registered in csrc/mta_kernels.cpp under WITH_CUDA).
// A plain header: no c10/cuda or ATen/cuda includes, so the .cu files compile against any torch.
#pragma once
#include <torch/types.h>

namespace mta_kernels {
namespace cuda {
#include "device_ops.h"  // NOLINT(build/include): the device ops' declarations, inside this namespace
}  // namespace cuda
}  // namespace mta_kernels
