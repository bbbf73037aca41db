"""The layout ops in plain torch: the fallback for the compiled extension (docs/design/layout.md).

Used when the C++ extension cannot be built or loaded (no compiler, a failed build), when
``MTA_KERNELS_EXT=torch`` asks for it, and for CUDA tensors when the extension was built without CUDA.
Every function takes the arguments of the op of the same name (the schemas in ``mta_kernels._extension``)
and gives the same result as the extension on the same device: the same values and dtypes, the same
exception types and the same messages for invalid inputs (``tests/test_layout_fallback.py`` compares
them on random layouts). The C++ sources whose behaviour is mirrored: ``csrc/layout_common.cpp`` (the
checks and messages), ``csrc/cpu/*.cpp`` and, for CUDA tensors, ``csrc/cuda/segments.cu`` (which clamps
where the CPU raises, to avoid a sync).

Vectorised torch, no Python loop over units or tokens (the work list is a loop over sequences, as in
C++: O(B) on the host). Slower than the extension (``benchmarks/NOTES.md``, "The layout ops without the
extension") and with the same host syncs on CUDA, except ``validate_layout`` (one copy, as in C++) and
``token_to_unit`` / ``unit_to_seq`` with ``num_units`` (none).
"""

from __future__ import annotations

import functools

import torch

_INT32_MAX = 2**31 - 1
_NO_ERROR = torch.iinfo(torch.int64).max
_NUM_CODES = 8  # error key = index * 8 + code, as in csrc/layout_checks.h

# Exactly the code points for which Python's str.isspace() is true (29), as csrc/cpu/char_spans_cpu.cpp.
_SPACES = (
    *range(0x09, 0x0E),
    *range(0x1C, 0x20),
    0x20,
    0x85,
    0xA0,
    0x1680,
    *range(0x2000, 0x200B),
    0x2028,
    0x2029,
    0x202F,
    0x205F,
    0x3000,
)


# ---------------------------------------------------------------------------------- message helpers
@functools.cache
def _dtype_name(dtype: torch.dtype) -> str:
    """c10's name of a dtype (``Long``, ``Int``, ``BFloat16``), as C++ error messages print it."""
    try:
        return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")
    except (RuntimeError, TypeError):
        return str(dtype).removeprefix("torch.")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_type(ok: bool, message: str) -> None:
    if not ok:
        raise TypeError(message)


def _check_value(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_cu_units_metadata(cu_units: torch.Tensor, op: str) -> None:
    _check_type(
        cu_units.dtype == torch.int32, f"{op}: cu_units must be int32, got {_dtype_name(cu_units.dtype)}"
    )
    _check_value(
        cu_units.dim() == 1 and cu_units.numel() >= 1,
        f"{op}: cu_units must be 1-D [B+1] with B >= 0, got shape {_shape(cu_units)}",
    )


def _check_non_decreasing(cu: torch.Tensor, op: str, name: str = "cu_units") -> None:
    """CPU ``cu``: the first ``cu[i] < cu[i-1]`` is a ValueError (the message of every op that checks it)."""
    bad = torch.nonzero(cu[1:] < cu[:-1])
    if bad.numel():
        i = int(bad[0, 0]) + 1
        raise ValueError(
            f"{op}: {name} must be non-decreasing, but {name}[{i}] = {int(cu[i])} < "
            f"{name}[{i - 1}] = {int(cu[i - 1])}"
        )


def _check_sorted_from_zero(cu: torch.Tensor, op: str) -> None:
    """CPU ``cu_units`` starts at 0 and never decreases (unit_to_seq, the work list)."""
    _check_value(int(cu[0]) == 0, f"{op}: cu_units[0] = {int(cu[0])}, but cu_units must start at 0")
    _check_non_decreasing(cu, op)


# ----------------------------------------------------------------------------------- validate_layout
def _check_layout_metadata(
    ranges: torch.Tensor, cu_units: torch.Tensor, num_tokens: int, seq_len: int
) -> None:
    op = "validate_layout"
    _check_type(ranges.dtype == torch.int32, f"{op}: ranges must be int32, got {_dtype_name(ranges.dtype)}")
    _check_cu_units_metadata(cu_units, op)
    _check_value(
        ranges.dim() == 2 and ranges.shape[1] == 2, f"{op}: ranges must be [U, 2], got shape {_shape(ranges)}"
    )
    _check_value(
        ranges.device == cu_units.device,
        f"{op}: ranges and cu_units must be on the same device, got ranges on {ranges.device} and "
        f"cu_units on {cu_units.device}",
    )
    _check_value(seq_len >= 0, f"{op}: seq_len must be >= 0, got {seq_len}")
    num_seqs = cu_units.numel() - 1
    _check_value(
        num_tokens == num_seqs * seq_len,
        f"{op}: num_tokens = {num_tokens} must equal B * seq_len = {num_seqs} * {seq_len} = "
        f"{num_seqs * seq_len} (B = cu_units.numel() - 1)",
    )
    _check_value(
        num_tokens <= _INT32_MAX,
        f"{op}: num_tokens = {num_tokens} does not fit the int32 token indices of ranges",
    )


def _first_key(code: torch.Tensor) -> torch.Tensor:
    """Smallest ``index * 8 + code`` over the entries with a non-zero code (a 0-d tensor, no sync)."""
    if code.numel() == 0:
        return torch.tensor(_NO_ERROR, device=code.device)
    index = torch.arange(code.numel(), device=code.device)
    return torch.where(code > 0, index * _NUM_CODES + code, _NO_ERROR).min()


def _cu_codes(cu: torch.Tensor, num_units: int) -> torch.Tensor:
    """Per entry i of cu_units (int64 [B+1]): the first failing check of csrc/layout_checks.h, or 0."""
    i = torch.arange(cu.numel(), device=cu.device)
    prev = torch.cat([cu[:1], cu[:-1]])
    last = cu.numel() - 1
    return torch.where(
        (i == 0) & (cu != 0),
        1,
        torch.where((i > 0) & (cu < prev), 2, torch.where((i == last) & (cu != num_units), 3, 0)),
    )


def _seq_of_units(cu: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Largest b in [0, B) with cu[b] <= u (0 when none): the binary search of csrc/layout_checks.h."""
    num_seqs = cu.numel() - 1
    return (torch.searchsorted(cu[:num_seqs].contiguous(), units, right=True) - 1).clamp(min=0)


def validate_layout(ranges: torch.Tensor, cu_units: torch.Tensor, num_tokens: int, seq_len: int) -> None:
    _check_layout_metadata(ranges, cu_units, num_tokens, seq_len)
    r = ranges.to(torch.int64)
    cu = cu_units.to(torch.int64)
    num_units, num_seqs = r.shape[0], cu.numel() - 1
    device = r.device
    cu_key = _first_key(_cu_codes(cu, num_units))
    # Unit checks on every unit at once; they count only when cu_units is valid (then b is the owner).
    u = torch.arange(num_units, device=device)
    b = _seq_of_units(cu, u)
    start, end = r[:, 0], r[:, 1]
    prev_start = torch.cat([start.new_zeros(1), start[:-1]])
    prev_end = torch.cat([end.new_zeros(1), end[:-1]])
    has_prev = u > cu[b]
    code = torch.where(
        start >= end,
        1,
        torch.where(
            (start < 0) | (end > num_tokens),
            2,
            torch.where(
                (start < b * seq_len) | (end > (b + 1) * seq_len),
                3,
                torch.where(
                    has_prev & (start < prev_start), 4, torch.where(has_prev & (start < prev_end), 5, 0)
                ),
            ),
        ),
    )
    unit_key = _first_key(code)
    # What the message needs, gathered on the device and brought back in one copy (as the CUDA op).
    i = (cu_key // _NUM_CODES).clamp(max=num_seqs)
    k = (unit_key // _NUM_CODES).clamp(max=max(num_units - 1, 0))
    zero = cu_key.new_zeros(())
    unit_facts = (
        [b[k], start[k], end[k], prev_start[k], prev_end[k]] if num_units else [zero] * 5
    )  # fmt: skip
    info = torch.stack([cu_key, cu[i], cu[(i - 1).clamp(min=0)], unit_key, *unit_facts]).tolist()
    _raise_layout_error(info, num_units, num_seqs, num_tokens, seq_len)


def _raise_layout_error(
    info: list[int], num_units: int, num_seqs: int, num_tokens: int, seq_len: int
) -> None:
    """The messages of raise_layout_error (csrc/layout_common.cpp)."""
    cu_key, v, prev, unit_key, b, start, end, prev_start, prev_end = info
    op = "validate_layout"
    if cu_key != _NO_ERROR:
        i, code = divmod(cu_key, _NUM_CODES)
        if code == 1:
            raise ValueError(f"{op}: cu_units[0] = {v}, but cu_units must start at 0")
        if code == 2:
            raise ValueError(
                f"{op}: cu_units must be non-decreasing, but cu_units[{i}] = {v} < "
                f"cu_units[{i - 1}] = {prev} "
                f"(sequence {i - 1} would have a negative number of units)"
            )
        raise ValueError(
            f"{op}: cu_units[-1] = cu_units[{num_seqs}] = {v}, but ranges has U = {num_units} units "
            "(cu_units must end at U)"
        )
    if unit_key == _NO_ERROR:
        return
    u, code = divmod(unit_key, _NUM_CODES)
    unit = f"{op}: unit {u} (sequence {b}, tokens [{start}, {end}))"
    previous = f"unit {u - 1} (tokens [{prev_start}, {prev_end}))"
    raise ValueError(
        {
            1: f"{unit} is empty or reversed: a unit needs start < end",
            2: f"{unit} is out of bounds: token indices must lie in [0, num_tokens = {num_tokens})",
            3: f"{unit} is not inside its sequence, which owns tokens [{b * seq_len}, {(b + 1) * seq_len}): "
            "a unit never crosses a sequence boundary",
            4: f"{unit} is out of order: it starts before {previous} of the same sequence; "
            "units must be sorted",
            5: f"{unit} overlaps {previous} of the same sequence; units must not overlap",
        }[code]
    )


# ------------------------------------------------------------------------ token_to_unit, unit_to_seq
def token_to_unit(ranges: torch.Tensor, num_tokens: int) -> torch.Tensor:
    op = "token_to_unit"
    _check_type(ranges.dtype == torch.int32, f"{op}: ranges must be int32, got {_dtype_name(ranges.dtype)}")
    _check_value(
        ranges.dim() == 2 and ranges.shape[1] == 2, f"{op}: ranges must be [U, 2], got shape {_shape(ranges)}"
    )
    _check_value(0 <= num_tokens <= _INT32_MAX, f"{op}: num_tokens must be in [0, 2**31), got {num_tokens}")
    r = ranges.to(torch.int64)
    if r.is_cuda:  # the CUDA kernel clamps to [0, N) instead of raising (no sync)
        return _token_to_unit_clamped(r, num_tokens)
    start, end = r[:, 0], r[:, 1]
    units = torch.arange(r.shape[0])
    bad = torch.nonzero((start < 0) | (end > num_tokens))
    if bad.numel():
        u = int(bad[0, 0])
        raise ValueError(
            f"{op}: unit {u} (tokens [{int(start[u])}, {int(end[u])})) is out of bounds [0, {num_tokens}); "
            "check the layout with validate_layout"
        )
    out = torch.full((num_tokens,), -1, dtype=torch.int32)
    lengths = (end - start).clamp(min=0)
    owner = torch.repeat_interleave(units, lengths)
    first = torch.repeat_interleave(start - (lengths.cumsum(0) - lengths), lengths)
    tokens = first + torch.arange(owner.numel())
    # Overlapping (invalid) units: the last one wins, as in the extension's loop.
    return out.scatter_reduce_(0, tokens, owner.to(torch.int32), "amax")


def _token_to_unit_clamped(r: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """CUDA semantics (csrc/cuda/segments.cu): ranges clamped to [0, N), no check, no host sync."""
    start, end = r[:, 0].clamp(0, num_tokens), r[:, 1].clamp(0, num_tokens)
    units = torch.arange(r.shape[0], device=r.device)
    # +(u+1) at start, -(u+1) at end: the running sum is u+1 inside unit u, 0 outside.
    mark = torch.where(start < end, units + 1, 0)
    edges = torch.zeros(num_tokens + 1, dtype=torch.int64, device=r.device)
    edges.index_add_(0, start, mark).index_add_(0, end, -mark)
    return (edges[:num_tokens].cumsum(0) - 1).to(torch.int32)


def _unit_to_seq_unchecked(cu: torch.Tensor, num_units: int | None) -> torch.Tensor:
    """CUDA semantics (csrc/cuda/segments.cu): no check of cu_units, -1 past cu_units[-1]; reads U back
    only when ``num_units`` is not given."""
    total = int(cu[-1]) if num_units is None else num_units
    _check_value(total >= 0, f"unit_to_seq: the number of units must be >= 0, got {total}")
    u = torch.arange(total, device=cu.device)
    inside = u < cu[-1] if cu.numel() > 1 else torch.zeros_like(u, dtype=torch.bool)
    return torch.where(inside, _seq_of_units(cu, u), -1).to(torch.int32)


def unit_to_seq(cu_units: torch.Tensor, num_units: int | None = None) -> torch.Tensor:
    op = "unit_to_seq"
    _check_cu_units_metadata(cu_units, op)
    cu = cu_units.to(torch.int64)
    num_seqs = cu.numel() - 1
    if cu.is_cuda:
        return _unit_to_seq_unchecked(cu, num_units)
    _check_sorted_from_zero(cu, op)
    total = int(cu[-1])
    _check_value(
        num_units is None or num_units == total,
        f"{op}: num_units = {num_units or 0} but cu_units[-1] = {total}",
    )
    counts = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(num_seqs, dtype=torch.int32), counts, output_size=total)


# ------------------------------------------------------------------------------ offsets_from_lengths
def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    op = "offsets_from_lengths"
    integral = not (
        lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool
    )
    _check_type(integral, f"{op}: lengths must have an integer dtype, got {_dtype_name(lengths.dtype)}")
    _check_value(lengths.dim() == 1, f"{op}: lengths must be 1-D [B], got shape {_shape(lengths)}")
    n = lengths.numel()
    lens = lengths.to(torch.int64)
    # Clamped at 2**31 before summing, so the int64 sum cannot wrap (as in C++).
    sums = lens.clamp(max=_INT32_MAX + 1).cumsum(0)
    negative = lens < 0
    first_negative = (
        torch.where(negative, torch.arange(n, device=lens.device), n).min() if n else lens.new_tensor(n)
    )
    total = sums[-1] if n else lens.new_zeros(())
    i, total = torch.stack([first_negative, total]).tolist()  # one copy for both checks, as on CUDA
    if i < n:
        raise ValueError(f"{op}: lengths[{i}] = {int(lens[i])} is negative")
    _check_value(
        total <= _INT32_MAX,
        f"{op}: the lengths sum to more than {_INT32_MAX}, which overflows the int32 offsets",
    )
    return torch.cat([sums.new_zeros(1), sums.clamp(max=_INT32_MAX)]).to(torch.int32)


# --------------------------------------------------------------------------- block_diagonal_work_list
def block_diagonal_work_list(cu_units: torch.Tensor, block_m: int) -> torch.Tensor:
    """The greedy packing of csrc/cpu/work_list_cpu.cpp, on the host (O(B)); the result on cu_units'
    device."""
    op = "block_diagonal_work_list"
    _check_cu_units_metadata(cu_units, op)
    _check_value(block_m >= 1, f"{op}: block_m must be >= 1, got {block_m}")
    cu = cu_units.to("cpu", torch.int64)
    _check_sorted_from_zero(cu, op)
    c = cu.tolist()
    rows: list[tuple[int, int, int, int]] = []
    pack: list[int] | None = None  # the open packed block [row_start, row_end]
    for s, e in zip(c, c[1:]):
        if e - s < 2:
            continue
        if e - s > block_m:
            if pack:
                rows.append((pack[0], pack[1], pack[0], pack[1]))
                pack = None
            rows += [(r, min(r + block_m, e), s, e) for r in range(s, e, block_m)]
        elif pack and e - pack[0] <= block_m:
            pack[1] = e
        else:
            if pack:
                rows.append((pack[0], pack[1], pack[0], pack[1]))
            pack = [s, e]
    if pack:
        rows.append((pack[0], pack[1], pack[0], pack[1]))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4).to(cu_units.device)


# -------------------------------------------------------------------------- char_spans_to_token_ranges
def _check_cu(cu: torch.Tensor, total: int, name: str, what: str) -> None:
    op = "char_spans_to_token_ranges"
    _check_value(int(cu[0]) == 0, f"{op}: {name}[0] = {int(cu[0])}, must be 0")
    _check_non_decreasing(cu, op, name)
    _check_value(int(cu[-1]) == total, f"{op}: {name}[-1] = {int(cu[-1])}, but there are {total} {what}")


def _check_char_span_inputs(codepoints, cu_chars, offsets, spans, cu_spans) -> None:
    op = "char_spans_to_token_ranges"
    _check_type(
        codepoints.dtype == torch.int32,
        f"{op}: codepoints must be int32, got {_dtype_name(codepoints.dtype)}",
    )
    for t, name in ((cu_chars, "cu_chars"), (offsets, "offsets"), (spans, "spans"), (cu_spans, "cu_spans")):
        _check_type(t.dtype == torch.int64, f"{op}: {name} must be int64, got {_dtype_name(t.dtype)}")
        _check_value(t.device.type == "cpu", f"{op}: {name} must be on the CPU, got {t.device}")
    _check_value(
        codepoints.device.type == "cpu", f"{op}: codepoints must be on the CPU, got {codepoints.device}"
    )
    _check_value(codepoints.dim() == 1, f"{op}: codepoints must be 1-D [C], got shape {_shape(codepoints)}")
    _check_value(
        offsets.dim() == 3 and offsets.shape[2] == 2,
        f"{op}: offsets must be [B, T, 2], got shape {_shape(offsets)}",
    )
    num_seqs = offsets.shape[0]
    for t, name in ((cu_chars, "cu_chars"), (cu_spans, "cu_spans")):
        _check_value(
            t.dim() == 1 and t.numel() == num_seqs + 1,
            f"{op}: {name} must be [B+1] = [{num_seqs + 1}], got shape {_shape(t)}",
        )
    _check_value(
        spans.dim() == 2 and spans.shape[1] == 2, f"{op}: spans must be [K, 2], got shape {_shape(spans)}"
    )


def char_spans_to_token_ranges(
    codepoints: torch.Tensor,
    cu_chars: torch.Tensor,
    offsets: torch.Tensor,
    spans: torch.Tensor,
    cu_spans: torch.Tensor,
) -> torch.Tensor:
    """The rule of csrc/cpu/char_spans_cpu.cpp (docs/method.md#mapping-units-to-tokens), vectorised: the
    whitespace skip is a lookup of the next non-space code point, the span walk a sorted search."""
    op = "char_spans_to_token_ranges"
    _check_char_span_inputs(codepoints, cu_chars, offsets, spans, cu_spans)
    num_seqs, seq_len = offsets.shape[0], offsets.shape[1]
    num_chars, num_spans = codepoints.numel(), spans.shape[0]
    _check_cu(cu_chars, num_chars, "cu_chars", "code points")
    _check_cu(cu_spans, num_spans, "cu_spans", "spans")
    text_len = cu_chars[1:] - cu_chars[:-1]  # [B]
    span_seq = torch.repeat_interleave(
        torch.arange(num_seqs), cu_spans[1:] - cu_spans[:-1], output_size=num_spans
    )
    s, e = spans[:, 0], spans[:, 1]
    first_of_seq = torch.arange(num_spans) == cu_spans[span_seq]
    prev_end = torch.cat([e.new_zeros(1), e[:-1]])
    reversed_or_outside = (s < 0) | (s > e) | (e > text_len[span_seq])
    unsorted = ~first_of_seq & (s < prev_end)
    bad = torch.nonzero(reversed_or_outside | unsorted)
    if bad.numel():
        k0 = int(bad[0, 0])
        b, sk, ek = int(span_seq[k0]), int(s[k0]), int(e[k0])
        span = f"{op}: span {k0} (sequence {b}, characters [{sk}, {ek}))"
        if bool(reversed_or_outside[k0]):
            raise ValueError(f"{span} is reversed or outside its text of {int(text_len[b])} characters")
        raise ValueError(
            f"{span} starts before the end of span {k0 - 1} ([{int(s[k0 - 1])}, {int(e[k0 - 1])})); "
            "the spans of a text must be sorted and non-overlapping"
        )

    out = torch.full((num_spans, 2), -1, dtype=torch.int64)
    ts, te = offsets[..., 0], offsets[..., 1]  # [B, T]
    active = ts < te  # special / padding tokens have an empty range
    bad = active & ((ts < 0) | (te > text_len[:, None]))
    if bool(bad.any()):
        b = int(torch.nonzero(bad.any(1))[0, 0])
        t = int(torch.nonzero(bad[b])[0, 0])
        raise ValueError(
            f"{op}: token {t} of sequence {b} has offsets [{int(ts[b, t])}, {int(te[b, t])}), "
            "outside its text "
            f"of {int(text_len[b])} characters"
        )
    if num_spans == 0 or seq_len == 0:
        return out
    # ts moves past whitespace: next_word[p] is the first non-space code point at or after p (global).
    positions = torch.arange(num_chars + 1)
    is_space = torch.isin(codepoints, torch.tensor(_SPACES, dtype=torch.int32))
    after = torch.where(torch.cat([is_space, is_space.new_ones(1)]), num_chars, positions)
    next_word = after.flip(0).cummin(0).values.flip(0)
    base = cu_chars[:-1, None]
    word_start = next_word[(base + ts).clamp(0, num_chars)] - base  # local; >= te when whitespace only
    keep = active & (word_start < te)
    # The span holding word_start: the first span of its sequence that ends after it, if it starts at or
    # before it. Keys (sequence, end) are sorted, so one search finds it for every token.
    stride = int(text_len.max()) + 2
    keys = span_seq * stride + e
    seq = torch.arange(num_seqs)[:, None].expand(num_seqs, seq_len)
    found = torch.searchsorted(keys, seq * stride + word_start, right=True)  # K when no span follows
    k = found.clamp(max=num_spans - 1)
    hit = keep & (found < cu_spans[1:, None]) & (s[k] <= word_start)
    tokens = torch.arange(seq_len).expand(num_seqs, seq_len)[hit]
    owner = k[hit]
    first = torch.full((num_spans,), seq_len, dtype=torch.int64).scatter_reduce_(0, owner, tokens, "amin")
    last = out[:, 1].clone().scatter_reduce_(0, owner, tokens + 1, "amax")
    return torch.stack([torch.where(last < 0, -1, first), last], dim=1)
