#include "segments.h"

#include <torch/torch.h>

namespace mta_kernels {
namespace cpu {

at::Tensor offsets_from_lengths(const at::Tensor& lengths) {
  TORCH_CHECK_VALUE(lengths.dim() == 1, "lengths must be 1-D, got ", lengths.dim(), "-D");
  auto l = lengths.to(at::kLong).contiguous();
  auto out = at::zeros({l.numel() + 1}, l.options());
  out.slice(0, 1).copy_(at::cumsum(l, 0));
  return out.to(at::kInt);
}

}  // namespace cpu
}  // namespace mta_kernels
