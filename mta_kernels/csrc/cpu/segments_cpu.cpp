// CPU versions of the small CSR helpers: offsets_from_lengths, token_to_unit, unit_to_seq.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "segments.h"

namespace mta_kernels {
namespace cpu {

at::Tensor offsets_from_lengths(const at::Tensor& lengths) {
  check_lengths_metadata(lengths);
  TORCH_CHECK_VALUE(lengths.device().is_cpu(), "offsets_from_lengths (CPU): lengths must be on the CPU");
  const auto l = lengths.to(at::kLong).contiguous();
  const int64_t* p = l.data_ptr<int64_t>();
  const int64_t n = l.numel();
  auto out = at::empty({n + 1}, l.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  // Same order of checks as the CUDA kernel: the first negative length, then the overflow of the sum.
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < 0) raise_lengths_error(i, p[i], 0);
  }
  int64_t total = 0;
  o[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += std::min(p[i], kMax + 1);  // clamped so the running sum itself never overflows int64
    o[i + 1] = static_cast<int32_t>(std::min(total, kMax));
  }
  if (total > kMax) raise_lengths_error(-1, 0, total);
  return out;
}

at::Tensor token_to_unit(const at::Tensor& ranges, int64_t num_tokens) {
  TORCH_CHECK_TYPE(ranges.scalar_type() == at::kInt, "token_to_unit: ranges must be int32, got ",
                   ranges.scalar_type());
  TORCH_CHECK_VALUE(ranges.dim() == 2 && ranges.size(1) == 2, "token_to_unit: ranges must be [U, 2], got shape ",
                    ranges.sizes());
  TORCH_CHECK_VALUE(num_tokens >= 0 && num_tokens <= std::numeric_limits<int32_t>::max(),
                    "token_to_unit: num_tokens must be in [0, 2**31), got ", num_tokens);
  const auto r = ranges.contiguous();
  const int32_t* rp = r.data_ptr<int32_t>();
  const int64_t num_units = r.size(0);
  for (int64_t u = 0; u < num_units; ++u) {
    const int64_t start = rp[2 * u], end = rp[2 * u + 1];
    TORCH_CHECK_VALUE(start >= 0 && end <= num_tokens, "token_to_unit: unit ", u, " (tokens [", start, ", ", end,
                      ")) is out of bounds [0, ", num_tokens, "); check the layout with validate_layout");
  }
  auto out = at::full({num_tokens}, -1, r.options());
  int32_t* o = out.data_ptr<int32_t>();
  // Units of a valid layout do not overlap, so the writes are disjoint and the result deterministic.
  // Memory-bound fills: threads only for large inputs (a pool wake-up costs more than small fills).
  at::parallel_for(0, num_units, 1 << 14, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) {
      for (int64_t t = rp[2 * u]; t < rp[2 * u + 1]; ++t) o[t] = static_cast<int32_t>(u);
    }
  });
  return out;
}

at::Tensor unit_to_seq(const at::Tensor& cu_units, std::optional<int64_t> num_units) {
  check_cu_units_metadata(cu_units, "unit_to_seq");
  const auto cu = cu_units.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t num_seqs = cu.numel() - 1;
  TORCH_CHECK_VALUE(c[0] == 0, "unit_to_seq: cu_units[0] = ", c[0], ", but cu_units must start at 0");
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b], "unit_to_seq: cu_units must be non-decreasing, but cu_units[", b + 1,
                      "] = ", c[b + 1], " < cu_units[", b, "] = ", c[b]);
  }
  const int64_t total = c[num_seqs];
  TORCH_CHECK_VALUE(!num_units.has_value() || *num_units == total, "unit_to_seq: num_units = ",
                    num_units.value_or(0), " but cu_units[-1] = ", total);
  auto out = at::empty({total}, cu.options());
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, num_seqs, 1 << 12, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) std::fill(o + c[b], o + c[b + 1], static_cast<int32_t>(b));
  });
  return out;
}

}  // namespace cpu
}  // namespace mta_kernels
