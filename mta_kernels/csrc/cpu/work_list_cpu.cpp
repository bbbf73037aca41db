// block_diagonal_work_list: the row blocks the varlen pairwise (DSA) kernels launch over.
//
// Greedy, in sequence order. A sequence with < 2 units has no pair and starts no block. A sequence
// with n <= block_m units joins the open block when the block, grown to the end of this sequence,
// still spans <= block_m units (units of skipped 0/1-unit sequences in between count, as a block is a
// contiguous range of rows); else it opens a new block. A sequence with n > block_m units gets
// ceil(n / block_m) blocks of its own (the last one shorter), whose columns are the whole sequence.
// Rows of a packed block pair only with rows of the same sequence: the kernel masks the others with
// unit_to_seq. The work list is computed on the host (it is O(B)); the CUDA op copies cu_units to the
// host, runs this, and copies the [W, 4] result back.
#include <algorithm>
#include <vector>

#include "segments.h"

namespace mta_kernels {
namespace cpu {

at::Tensor block_diagonal_work_list(const at::Tensor& cu_units, int64_t block_m) {
  check_cu_units_metadata(cu_units, "block_diagonal_work_list");
  TORCH_CHECK_VALUE(block_m >= 1, "block_diagonal_work_list: block_m must be >= 1, got ", block_m);
  const auto cu = cu_units.to(at::kCPU).contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t num_seqs = cu.numel() - 1;
  TORCH_CHECK_VALUE(c[0] == 0, "block_diagonal_work_list: cu_units[0] = ", c[0], ", but cu_units must start at 0");
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b], "block_diagonal_work_list: cu_units must be non-decreasing, but cu_units[",
                      b + 1, "] = ", c[b + 1], " < cu_units[", b, "] = ", c[b]);
  }

  std::vector<int32_t> rows;  // W x (row_start, row_end, col_start, col_end)
  auto push = [&rows](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    rows.insert(rows.end(), {static_cast<int32_t>(r0), static_cast<int32_t>(r1), static_cast<int32_t>(c0),
                             static_cast<int32_t>(c1)});
  };
  int64_t pack_start = -1, pack_end = -1;  // the open packed block, if pack_start >= 0
  auto flush = [&]() {
    if (pack_start >= 0) push(pack_start, pack_end, pack_start, pack_end);
    pack_start = -1;
  };
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t s = c[b], e = c[b + 1];
    if (e - s < 2) continue;
    if (e - s > block_m) {
      flush();
      for (int64_t r = s; r < e; r += block_m) push(r, std::min(r + block_m, e), s, e);
    } else if (pack_start >= 0 && e - pack_start <= block_m) {
      pack_end = e;
    } else {
      flush();
      pack_start = s;
      pack_end = e;
    }
  }
  flush();

  const int64_t num_blocks = static_cast<int64_t>(rows.size()) / 4;
  auto out = at::empty({num_blocks, 4}, cu.options());
  std::copy(rows.begin(), rows.end(), out.data_ptr<int32_t>());
  return out.to(cu_units.device());
}

}  // namespace cpu
}  // namespace mta_kernels
