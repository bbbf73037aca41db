// Checks and error messages shared by the CPU and CUDA layout ops, so both raise the same error.
#include <limits>

#include "layout_checks.h"
#include "segments.h"

namespace mta_kernels {

using namespace layout;

void check_cu_units_metadata(const at::Tensor& cu_units, const char* op) {
  TORCH_CHECK_TYPE(cu_units.scalar_type() == at::kInt, op, ": cu_units must be int32, got ",
                   cu_units.scalar_type());
  TORCH_CHECK_VALUE(cu_units.dim() == 1 && cu_units.numel() >= 1, op,
                    ": cu_units must be 1-D [B+1] with B >= 0, got shape ", cu_units.sizes());
}

void check_layout_metadata(const at::Tensor& ranges, const at::Tensor& cu_units, int64_t num_tokens,
                           int64_t seq_len) {
  TORCH_CHECK_TYPE(ranges.scalar_type() == at::kInt, "validate_layout: ranges must be int32, got ",
                   ranges.scalar_type());
  check_cu_units_metadata(cu_units, "validate_layout");
  TORCH_CHECK_VALUE(ranges.dim() == 2 && ranges.size(1) == 2, "validate_layout: ranges must be [U, 2], got shape ",
                    ranges.sizes());
  TORCH_CHECK_VALUE(ranges.device() == cu_units.device(),
                    "validate_layout: ranges and cu_units must be on the same device, got ranges on ",
                    ranges.device(), " and cu_units on ", cu_units.device());
  TORCH_CHECK_VALUE(seq_len >= 0, "validate_layout: seq_len must be >= 0, got ", seq_len);
  const int64_t num_seqs = cu_units.numel() - 1;
  TORCH_CHECK_VALUE(num_tokens == num_seqs * seq_len, "validate_layout: num_tokens = ", num_tokens,
                    " must equal B * seq_len = ", num_seqs, " * ", seq_len, " = ", num_seqs * seq_len,
                    " (B = cu_units.numel() - 1)");
  TORCH_CHECK_VALUE(num_tokens <= std::numeric_limits<int32_t>::max(), "validate_layout: num_tokens = ",
                    num_tokens, " does not fit the int32 token indices of ranges");
}

void raise_layout_error(const int64_t* info, int64_t num_units, int64_t num_seqs, int64_t num_tokens,
                        int64_t seq_len) {
  const int64_t cu_key = info[kInfoCuKey];
  if (cu_key != kNoError) {
    const int64_t i = cu_key / kNumCodes, code = cu_key % kNumCodes, v = info[kInfoCuValue];
    switch (code) {
      case kCuFirstNotZero:
        TORCH_CHECK_VALUE(false, "validate_layout: cu_units[0] = ", v, ", but cu_units must start at 0");
      case kCuDecreasing:
        TORCH_CHECK_VALUE(false, "validate_layout: cu_units must be non-decreasing, but cu_units[", i, "] = ", v,
                          " < cu_units[", i - 1, "] = ", info[kInfoCuPrev], " (sequence ", i - 1,
                          " would have a negative number of units)");
      default:
        TORCH_CHECK_VALUE(false, "validate_layout: cu_units[-1] = cu_units[", num_seqs, "] = ", v,
                          ", but ranges has U = ", num_units, " units (cu_units must end at U)");
    }
  }
  const int64_t unit_key = info[kInfoUnitKey];
  if (unit_key == kNoError) return;
  const int64_t u = unit_key / kNumCodes, code = unit_key % kNumCodes, b = info[kInfoSeq];
  const int64_t start = info[kInfoStart], end = info[kInfoEnd];
  switch (code) {
    case kUnitEmpty:
      TORCH_CHECK_VALUE(false, "validate_layout: unit ", u, " (sequence ", b, ", tokens [", start, ", ", end,
                        ")) is empty or reversed: a unit needs start < end");
    case kUnitOutOfBounds:
      TORCH_CHECK_VALUE(false, "validate_layout: unit ", u, " (sequence ", b, ", tokens [", start, ", ", end,
                        ")) is out of bounds: token indices must lie in [0, num_tokens = ", num_tokens, ")");
    case kUnitCrossesSeq:
      TORCH_CHECK_VALUE(false, "validate_layout: unit ", u, " (sequence ", b, ", tokens [", start, ", ", end,
                        ")) is not inside its sequence, which owns tokens [", b * seq_len, ", ",
                        (b + 1) * seq_len, "): a unit never crosses a sequence boundary");
    case kUnitUnsorted:
      TORCH_CHECK_VALUE(false, "validate_layout: unit ", u, " (sequence ", b, ", tokens [", start, ", ", end,
                        ")) is out of order: it starts before unit ", u - 1, " (tokens [", info[kInfoPrevStart],
                        ", ", info[kInfoPrevEnd], ")) of the same sequence; units must be sorted");
    default:
      TORCH_CHECK_VALUE(false, "validate_layout: unit ", u, " (sequence ", b, ", tokens [", start, ", ", end,
                        ")) overlaps unit ", u - 1, " (tokens [", info[kInfoPrevStart], ", ", info[kInfoPrevEnd],
                        ")) of the same sequence; units must not overlap");
  }
}

void check_lengths_metadata(const at::Tensor& lengths) {
  TORCH_CHECK_TYPE(at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false),
                   "offsets_from_lengths: lengths must have an integer dtype, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1, "offsets_from_lengths: lengths must be 1-D [B], got shape ",
                    lengths.sizes());
}

void raise_lengths_error(int64_t first_negative, int64_t negative_value, int64_t total) {
  TORCH_CHECK_VALUE(first_negative < 0, "offsets_from_lengths: lengths[", first_negative, "] = ", negative_value,
                    " is negative");
  TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), "offsets_from_lengths: the lengths sum to more than ",
                    std::numeric_limits<int32_t>::max(), ", which overflows the int32 offsets");
}

}  // namespace mta_kernels
