// Per-element checks of the packed layout (docs/method.md#packed-layout), shared by the CPU loop and
// the CUDA kernel so that both find the same first offending entry and report it with the same
// message.
//
// A check returns 0 when the entry is fine, else an error code. The first error of a layout is the
// smallest key `index * kNumCodes + code`: cu_units errors are reported before unit errors (a unit
// cannot be attributed to a sequence while cu_units is broken), and among units the smallest index.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MTA_HD __host__ __device__ __forceinline__
#else
#define MTA_HD inline
#endif

namespace mta_kernels {
namespace layout {

constexpr int64_t kNumCodes = 8;
constexpr int64_t kNoError = INT64_MAX;

// cu_units errors, checked at entry i of cu_units [B+1].
enum CuCode : int64_t {
  kCuFirstNotZero = 1,   // i == 0 and cu_units[0] != 0
  kCuDecreasing = 2,     // cu_units[i] < cu_units[i-1]
  kCuLastNotU = 3,       // i == B and cu_units[B] != U
};

// Unit errors, checked at unit u of sequence b.
enum UnitCode : int64_t {
  kUnitEmpty = 1,         // start >= end
  kUnitOutOfBounds = 2,   // start < 0 or end > num_tokens
  kUnitCrossesSeq = 3,    // not inside [b*seq_len, (b+1)*seq_len)
  kUnitUnsorted = 4,      // start < start of the previous unit of the sequence
  kUnitOverlaps = 5,      // start < end of the previous unit of the sequence
};

MTA_HD int64_t check_cu_entry(const int32_t* cu, int64_t i, int64_t num_seqs, int64_t num_units) {
  const int64_t v = cu[i];
  if (i == 0 && v != 0) return kCuFirstNotZero;
  if (i > 0 && v < static_cast<int64_t>(cu[i - 1])) return kCuDecreasing;
  if (i == num_seqs && v != num_units) return kCuLastNotU;
  return 0;
}

// Sequence of unit u: the largest b in [0, B) with cu[b] <= u (binary search over a valid cu_units;
// on an invalid one the answer is some b in [0, B), never out of range).
MTA_HD int64_t seq_of_unit(const int32_t* cu, int64_t num_seqs, int64_t u) {
  int64_t lo = 0, hi = num_seqs;  // answer in [lo, hi); cu[0] <= u is assumed
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(cu[mid]) <= u) lo = mid;
    else hi = mid;
  }
  return lo;
}

// ranges is [U, 2] contiguous; b is the sequence of u (seq_of_unit), num_seqs >= 1.
MTA_HD int64_t check_unit(const int32_t* ranges, const int32_t* cu, int64_t u, int64_t b, int64_t seq_len,
                          int64_t num_tokens) {
  const int64_t start = ranges[2 * u], end = ranges[2 * u + 1];
  if (start >= end) return kUnitEmpty;
  if (start < 0 || end > num_tokens) return kUnitOutOfBounds;
  if (start < b * seq_len || end > (b + 1) * seq_len) return kUnitCrossesSeq;
  if (u > 0 && u > static_cast<int64_t>(cu[b])) {  // u > 0: never read ranges[-1] (broken cu_units)
    if (start < static_cast<int64_t>(ranges[2 * (u - 1)])) return kUnitUnsorted;
    if (start < static_cast<int64_t>(ranges[2 * (u - 1) + 1])) return kUnitOverlaps;
  }
  return 0;
}

// What the host needs to word the message: filled by the CPU loop or by the CUDA "finalize" kernel.
// Slots of the int64 [kInfoSize] report.
enum InfoSlot : int {
  kInfoCuKey = 0,      // first cu_units key or kNoError
  kInfoCuValue = 1,    // cu_units[i]
  kInfoCuPrev = 2,     // cu_units[i-1] (i > 0)
  kInfoUnitKey = 3,    // first unit key or kNoError
  kInfoSeq = 4,        // sequence of the unit
  kInfoStart = 5,
  kInfoEnd = 6,
  kInfoPrevStart = 7,  // previous unit of the same sequence (when the code is unsorted/overlaps)
  kInfoPrevEnd = 8,
  kInfoSize = 9,
};

// Fills info[] from the two first keys (both already in info[kInfoCuKey], info[kInfoUnitKey]).
MTA_HD void fill_info(int64_t* info, const int32_t* ranges, const int32_t* cu, int64_t num_seqs) {
  const int64_t cu_key = info[kInfoCuKey];
  if (cu_key != kNoError) {
    const int64_t i = cu_key / kNumCodes;
    info[kInfoCuValue] = cu[i];
    info[kInfoCuPrev] = i > 0 ? static_cast<int64_t>(cu[i - 1]) : 0;
    return;  // unit details are meaningless while cu_units is broken
  }
  const int64_t unit_key = info[kInfoUnitKey];
  if (unit_key != kNoError) {
    const int64_t u = unit_key / kNumCodes;
    const int64_t b = seq_of_unit(cu, num_seqs, u);
    info[kInfoSeq] = b;
    info[kInfoStart] = ranges[2 * u];
    info[kInfoEnd] = ranges[2 * u + 1];
    info[kInfoPrevStart] = u > 0 ? static_cast<int64_t>(ranges[2 * (u - 1)]) : 0;
    info[kInfoPrevEnd] = u > 0 ? static_cast<int64_t>(ranges[2 * (u - 1) + 1]) : 0;
  }
}

}  // namespace layout
}  // namespace mta_kernels
