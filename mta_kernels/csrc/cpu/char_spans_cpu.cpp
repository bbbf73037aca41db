// char_spans_to_token_ranges (docs/method.md#mapping-units-to-tokens), CPU only: a host preprocessing
// step.
//
// Token t of sequence b covers characters [ts, te) of its text (HF offset_mapping). ts moves forward
// past whitespace (Python's str.isspace()); if then ts >= te the token belongs to no unit, else to the
// unit whose character span contains ts. A unit's token range is [first token, last token + 1), local
// to its sequence, or [-1, -1] when it got no token. Offsets are monotone, so one pointer walks the
// spans of a sequence as t grows: O(T + K) per sequence; sequences run in parallel.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "segments.h"

namespace mta_kernels {
namespace cpu {

namespace {

// Exactly the code points for which Python's str.isspace() is true (bidi class WS/B/S or category Zs).
inline bool is_py_space(int64_t c) {
  if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f);
  if (c < 0x85) return false;
  return c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 ||
         c == 0x202f || c == 0x205f || c == 0x3000;
}

// cu must be [B+1], start at 0, be non-decreasing and end at total.
void check_cu(const int64_t* cu, int64_t num_seqs, int64_t total, const char* name, const char* what) {
  TORCH_CHECK_VALUE(cu[0] == 0, "char_spans_to_token_ranges: ", name, "[0] = ", cu[0], ", must be 0");
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], "char_spans_to_token_ranges: ", name, " must be non-decreasing, but ",
                      name, "[", b + 1, "] = ", cu[b + 1], " < ", name, "[", b, "] = ", cu[b]);
  }
  TORCH_CHECK_VALUE(cu[num_seqs] == total, "char_spans_to_token_ranges: ", name, "[-1] = ", cu[num_seqs],
                    ", but there are ", total, " ", what);
}

}  // namespace

at::Tensor char_spans_to_token_ranges(const at::Tensor& codepoints, const at::Tensor& cu_chars,
                                      const at::Tensor& offsets, const at::Tensor& spans,
                                      const at::Tensor& cu_spans) {
  const char* op = "char_spans_to_token_ranges";
  TORCH_CHECK_TYPE(codepoints.scalar_type() == at::kInt, op, ": codepoints must be int32, got ",
                   codepoints.scalar_type());
  for (const auto& [t, name] : {std::pair{&cu_chars, "cu_chars"}, std::pair{&offsets, "offsets"},
                                std::pair{&spans, "spans"}, std::pair{&cu_spans, "cu_spans"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t->device());
  }
  TORCH_CHECK_VALUE(codepoints.device().is_cpu(), op, ": codepoints must be on the CPU, got ", codepoints.device());
  TORCH_CHECK_VALUE(codepoints.dim() == 1, op, ": codepoints must be 1-D [C], got shape ", codepoints.sizes());
  TORCH_CHECK_VALUE(offsets.dim() == 3 && offsets.size(2) == 2, op, ": offsets must be [B, T, 2], got shape ",
                    offsets.sizes());
  const int64_t num_seqs = offsets.size(0), seq_len = offsets.size(1);
  TORCH_CHECK_VALUE(cu_chars.dim() == 1 && cu_chars.numel() == num_seqs + 1, op, ": cu_chars must be [B+1] = [",
                    num_seqs + 1, "], got shape ", cu_chars.sizes());
  TORCH_CHECK_VALUE(cu_spans.dim() == 1 && cu_spans.numel() == num_seqs + 1, op, ": cu_spans must be [B+1] = [",
                    num_seqs + 1, "], got shape ", cu_spans.sizes());
  TORCH_CHECK_VALUE(spans.dim() == 2 && spans.size(1) == 2, op, ": spans must be [K, 2], got shape ", spans.sizes());

  const auto text = codepoints.contiguous();
  const auto cc = cu_chars.contiguous();
  const auto off = offsets.contiguous();
  const auto sp = spans.contiguous();
  const auto cs = cu_spans.contiguous();
  const int32_t* chars = text.data_ptr<int32_t>();
  const int64_t* cu_c = cc.data_ptr<int64_t>();
  const int64_t* offs = off.data_ptr<int64_t>();
  const int64_t* spn = sp.data_ptr<int64_t>();
  const int64_t* cu_s = cs.data_ptr<int64_t>();
  const int64_t num_spans = sp.size(0);
  check_cu(cu_c, num_seqs, text.numel(), "cu_chars", "code points");
  check_cu(cu_s, num_seqs, num_spans, "cu_spans", "spans");
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t text_len = cu_c[b + 1] - cu_c[b];
    for (int64_t k = cu_s[b]; k < cu_s[b + 1]; ++k) {
      const int64_t s = spn[2 * k], e = spn[2 * k + 1];
      TORCH_CHECK_VALUE(0 <= s && s <= e && e <= text_len, op, ": span ", k, " (sequence ", b, ", characters [", s,
                        ", ", e, ")) is reversed or outside its text of ", text_len, " characters");
      TORCH_CHECK_VALUE(k == cu_s[b] || s >= spn[2 * k - 1], op, ": span ", k, " (sequence ", b, ", characters [",
                        s, ", ", e, ")) starts before the end of span ", k - 1, " ([", spn[2 * k - 2], ", ",
                        spn[2 * k - 1], ")); the spans of a text must be sorted and non-overlapping");
    }
  }

  auto out = at::full({num_spans, 2}, -1, sp.options());
  int64_t* o = out.data_ptr<int64_t>();
  // First bad token per sequence (-1: none); reported after the parallel region, smallest b first.
  std::vector<int64_t> bad_token(num_seqs, -1);
  // Threads only pay off for big batches: a sequence is ~1 us of work, waking a thread pool costs more
  // (and far more on a loaded machine). Chunks of >= ~64k tokens.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(seq_len, 1));
  at::parallel_for(0, num_seqs, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int32_t* txt = chars + cu_c[b];
      const int64_t text_len = cu_c[b + 1] - cu_c[b];
      const int64_t k0 = cu_s[b], k1 = cu_s[b + 1];
      const int64_t* tok = offs + 2 * b * seq_len;
      int64_t k = k0, prev_ts = 0;
      for (int64_t t = 0; t < seq_len; ++t) {
        int64_t ts = tok[2 * t];
        const int64_t te = tok[2 * t + 1];
        if (ts >= te) continue;  // special / padding token: empty range
        if (ts < 0 || te > text_len) {
          bad_token[b] = t;
          break;
        }
        while (ts < te && is_py_space(txt[ts])) ++ts;
        if (ts >= te) continue;  // whitespace token
        if (ts < prev_ts) k = k0;  // offsets went backwards (unusual tokenizer): restart the walk
        prev_ts = ts;
        while (k < k1 && spn[2 * k + 1] <= ts) ++k;
        if (k == k1 || spn[2 * k] > ts) continue;  // between units
        int64_t* r = o + 2 * k;
        r[0] = r[0] < 0 ? t : std::min(r[0], t);
        r[1] = std::max(r[1], t + 1);
      }
    }
  });
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t t = bad_token[b];
    TORCH_CHECK_VALUE(t < 0, op, ": token ", t, " of sequence ", b, " has offsets [", offs[2 * (b * seq_len + t)],
                      ", ", offs[2 * (b * seq_len + t) + 1], "), outside its text of ", cu_c[b + 1] - cu_c[b],
                      " characters");
  }
  return out;
}

}  // namespace cpu
}  // namespace mta_kernels
