// CPU validate_layout: one pass over cu_units, then one over the units; the first offending entry
// (smallest key of layout_checks.h, the same rule as the CUDA kernel) is reported.
#include "layout_checks.h"
#include "segments.h"

namespace mta_kernels {
namespace cpu {

using namespace layout;

void validate_layout(const at::Tensor& ranges, const at::Tensor& cu_units, int64_t num_tokens, int64_t seq_len) {
  check_layout_metadata(ranges, cu_units, num_tokens, seq_len);
  const auto r = ranges.contiguous();
  const auto cu = cu_units.contiguous();
  const int32_t* rp = r.data_ptr<int32_t>();
  const int32_t* cp = cu.data_ptr<int32_t>();
  const int64_t num_units = r.size(0), num_seqs = cu.numel() - 1;

  int64_t info[kInfoSize] = {kNoError, 0, 0, kNoError, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i <= num_seqs && info[kInfoCuKey] == kNoError; ++i) {
    const int64_t code = check_cu_entry(cp, i, num_seqs, num_units);
    if (code) info[kInfoCuKey] = i * kNumCodes + code;
  }
  if (info[kInfoCuKey] == kNoError) {
    // cu_units is valid here, so the units of sequence b are exactly cp[b]:cp[b+1].
    for (int64_t b = 0; b < num_seqs && info[kInfoUnitKey] == kNoError; ++b) {
      for (int64_t u = cp[b]; u < cp[b + 1]; ++u) {
        const int64_t code = check_unit(rp, cp, u, b, seq_len, num_tokens);
        if (code) {
          info[kInfoUnitKey] = u * kNumCodes + code;
          break;
        }
      }
    }
  }
  fill_info(info, rp, cp, num_seqs);
  raise_layout_error(info, num_units, num_seqs, num_tokens, seq_len);
}

}  // namespace cpu
}  // namespace mta_kernels
