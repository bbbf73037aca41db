// CUDA versions of the small CSR helpers: token_to_unit, unit_to_seq, offsets_from_lengths.
// Results are identical to the CPU versions (csrc/cpu/segments_cpu.cpp) on valid inputs.
#include <c10/core/DeviceGuard.h>
#include <torch/types.h>

#include <limits>

#include "cuda/common.cuh"
#include "cuda/layout_cuda.h"
#include "layout_checks.h"
#include "segments.h"

namespace mta_kernels {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// One block per unit (grid-stride over units), its threads stride over the unit's tokens: units of a
// valid layout are disjoint, so every token is written at most once. Ranges are clamped to [0, N).
__global__ void token_to_unit_kernel(const int32_t* __restrict__ ranges, int64_t num_units, int64_t num_tokens,
                                     int32_t* __restrict__ out) {
  for (int64_t u = blockIdx.x; u < num_units; u += gridDim.x) {
    const int64_t start = max(static_cast<int64_t>(ranges[2 * u]), int64_t{0});
    const int64_t end = min(static_cast<int64_t>(ranges[2 * u + 1]), num_tokens);
    for (int64_t t = start + threadIdx.x; t < end; t += blockDim.x) out[t] = static_cast<int32_t>(u);
  }
}

// One thread per unit: binary search of u in cu_units; -1 past cu_units[-1].
__global__ void unit_to_seq_kernel(const int32_t* __restrict__ cu, int64_t num_seqs, int64_t num_units,
                                   int32_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < num_units; u += stride) {
    const bool inside = num_seqs > 0 && u < static_cast<int64_t>(cu[num_seqs]);
    out[u] = inside ? static_cast<int32_t>(layout::seq_of_unit(cu, num_seqs, u)) : -1;
  }
}

// One block scans all lengths in chunks of blockDim.x (B is a batch size: small). Lengths are clamped
// to 2**31 before summing, so the int64 sum never overflows and > INT32_MAX means int32 overflow.
// status: [first negative index or -1, its value, clamped total].
constexpr int kScanThreads = 1024;
__global__ void offsets_from_lengths_kernel(const int64_t* __restrict__ lengths, int64_t n,
                                            int32_t* __restrict__ out, int64_t* __restrict__ status) {
  __shared__ int64_t scan[kScanThreads];
  __shared__ unsigned long long first_negative;
  __shared__ int64_t carry;
  const int tid = threadIdx.x;
  if (tid == 0) {
    first_negative = ~0ull;
    carry = 0;
    out[0] = 0;
  }
  __syncthreads();
  for (int64_t base = 0; base < n; base += kScanThreads) {
    const int64_t i = base + tid;
    int64_t v = i < n ? lengths[i] : 0;
    if (v < 0) {
      atomicMin(&first_negative, static_cast<unsigned long long>(i));
      v = 0;
    }
    scan[tid] = min(v, kInt32Max + 1);
    __syncthreads();
    for (int off = 1; off < kScanThreads; off <<= 1) {  // Hillis-Steele inclusive scan
      const int64_t x = tid >= off ? scan[tid - off] : 0;
      __syncthreads();
      scan[tid] += x;
      __syncthreads();
    }
    const int64_t total = carry + scan[tid];
    if (i < n) out[i + 1] = static_cast<int32_t>(min(total, kInt32Max));
    __syncthreads();  // everyone has read carry
    if (tid == kScanThreads - 1) carry = total;
    __syncthreads();
  }
  if (tid == 0) {
    const bool negative = first_negative != ~0ull;
    status[0] = negative ? static_cast<int64_t>(first_negative) : -1;
    status[1] = negative ? lengths[first_negative] : 0;
    status[2] = carry;
  }
}

}  // namespace

at::Tensor token_to_unit(const at::Tensor& ranges, int64_t num_tokens) {
  TORCH_CHECK_TYPE(ranges.scalar_type() == at::kInt, "token_to_unit: ranges must be int32, got ",
                   ranges.scalar_type());
  TORCH_CHECK_VALUE(ranges.dim() == 2 && ranges.size(1) == 2, "token_to_unit: ranges must be [U, 2], got shape ",
                    ranges.sizes());
  TORCH_CHECK_VALUE(num_tokens >= 0 && num_tokens <= kInt32Max, "token_to_unit: num_tokens must be in [0, 2**31), got ",
                    num_tokens);
  const c10::DeviceGuard guard(ranges.device());
  const auto r = ranges.contiguous();
  const int64_t num_units = r.size(0);
  auto out = at::full({num_tokens}, -1, r.options());
  if (num_units > 0 && num_tokens > 0) {
    token_to_unit_kernel<<<grid_for(num_units, 1), 128, 0, current_stream()>>>(r.data_ptr<int32_t>(), num_units,
                                                                                num_tokens, out.data_ptr<int32_t>());
    check_launch("token_to_unit");
  }
  return out;
}

at::Tensor unit_to_seq(const at::Tensor& cu_units, std::optional<int64_t> num_units) {
  check_cu_units_metadata(cu_units, "unit_to_seq");
  const c10::DeviceGuard guard(cu_units.device());
  const auto cu = cu_units.contiguous();
  const int64_t num_seqs = cu.numel() - 1;
  // Without num_units, U = cu_units[-1] is read back (a sync); callers that know U pass it.
  const int64_t total = num_units.has_value() ? *num_units : cu[num_seqs].item<int64_t>();
  TORCH_CHECK_VALUE(total >= 0, "unit_to_seq: the number of units must be >= 0, got ", total);
  auto out = at::empty({total}, cu.options());
  if (total > 0) {
    unit_to_seq_kernel<<<grid_for(total, kThreads), kThreads, 0, current_stream()>>>(
        cu.data_ptr<int32_t>(), num_seqs, total, out.data_ptr<int32_t>());
    check_launch("unit_to_seq");
  }
  return out;
}

at::Tensor offsets_from_lengths(const at::Tensor& lengths) {
  check_lengths_metadata(lengths);
  const c10::DeviceGuard guard(lengths.device());
  const auto l = lengths.to(at::kLong).contiguous();
  const int64_t n = l.numel();
  auto out = at::empty({n + 1}, l.options().dtype(at::kInt));
  auto status = at::empty({3}, l.options());
  offsets_from_lengths_kernel<<<1, kScanThreads, 0, current_stream()>>>(l.data_ptr<int64_t>(), n,
                                                                          out.data_ptr<int32_t>(),
                                                                          status.data_ptr<int64_t>());
  check_launch("offsets_from_lengths");
  const auto host = status.to(at::kCPU);  // one device-to-host copy for both checks
  const int64_t* s = host.data_ptr<int64_t>();
  if (s[0] >= 0 || s[2] > kInt32Max) raise_lengths_error(s[0], s[1], s[2]);
  return out;
}

}  // namespace cuda
}  // namespace mta_kernels
