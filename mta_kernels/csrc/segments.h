// Declarations of the layout ops (docs/method.md#packed-layout): CPU implementations, and the
// checks and messages the CPU and CUDA implementations share.
#pragma once
#include <torch/types.h>

namespace mta_kernels {

// Metadata checks of validate_layout (dtype -> TypeError, the rest -> ValueError); no data access.
void check_layout_metadata(const at::Tensor& ranges, const at::Tensor& cu_units, int64_t num_tokens,
                           int64_t seq_len);
// cu_units must be int32 [B+1] (B >= 0).
void check_cu_units_metadata(const at::Tensor& cu_units, const char* op);
// Raises the ValueError for the first offending entry described by info (layout_checks.h), if any.
void raise_layout_error(const int64_t* info, int64_t num_units, int64_t num_seqs, int64_t num_tokens,
                        int64_t seq_len);
// lengths: integral, 1-D. op names the caller in messages.
void check_lengths_metadata(const at::Tensor& lengths);
// Raises when offsets_from_lengths found a negative length (first_negative >= 0) or int32 overflow.
void raise_lengths_error(int64_t first_negative, int64_t negative_value, int64_t total);

namespace cpu {
#include "device_ops.h"  // NOLINT(build/include): the device ops' declarations, inside this namespace
at::Tensor char_spans_to_token_ranges(const at::Tensor& codepoints, const at::Tensor& cu_chars,
                                      const at::Tensor& offsets, const at::Tensor& spans,
                                      const at::Tensor& cu_spans);
}  // namespace cpu

}  // namespace mta_kernels
