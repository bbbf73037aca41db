"""The layout ops with and without the C++ extension (CPU): the compiled kernels against the pure-torch
fallback that runs where the extension cannot be built (docs/design/layout.md).

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_layout_backends.py --benchmark-only``. Sizes: the
layout benchmark's (B = 16, T = 512 / 2048, the measured word density; ops called directly, no layout
plan), and the alignment benchmark's batch for ``char_spans_to_token_ranges`` (64 texts of ~200 words,
byte-level BPE; through ``layout.char_spans_to_token_ranges``, the text encoding included). The numbers
go to ``benchmarks/NOTES.md`` ("The layout ops without the extension").
"""

from __future__ import annotations

import pytest
import torch
from synthetic import synth_ranges, units_per_sequence

from mta_kernels import _extension, layout
from mta_kernels import _layout_fallback as fallback

# "C++": the compiled ops called directly; "C++ routed": the public ops torch.ops.mta_kernels.*, whose
# Python kernels pass the call on (what the package runs); "torch": the fallback's functions.
BACKENDS = ["C++", "C++ routed", "torch"]


@pytest.fixture(scope="module", params=[512, 2048], ids=lambda t: f"B16-T{t}")
def words(request):
    seq_len = request.param
    n, c = units_per_sequence(seq_len, "word")
    ranges = synth_ranges(16, seq_len, n, c, torch.Generator().manual_seed(0))
    cu = torch.arange(0, 17 * n, n, dtype=torch.int32)
    return ranges, cu, seq_len


def implementation(backend: str):
    if backend == "torch":
        return fallback
    state = _extension.load()
    if state.kind == "torch":
        pytest.skip("no compiled extension here")
    if backend == "C++ routed":
        return torch.ops.mta_kernels
    return _extension._compiled_ops()


CALLS = {
    "validate_layout": lambda ops, r, cu, T: ops.validate_layout(r, cu, 16 * T, T),
    "token_to_unit": lambda ops, r, cu, T: ops.token_to_unit(r, 16 * T),
    "unit_to_seq": lambda ops, r, cu, T: ops.unit_to_seq(cu, r.shape[0]),
    "offsets_from_lengths": lambda ops, r, cu, T: ops.offsets_from_lengths(cu[1:] - cu[:-1]),
    "block_diagonal_work_list": lambda ops, r, cu, T: ops.block_diagonal_work_list(cu, 64),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CALLS))
def test_layout_op(benchmark, words, op, backend):
    ops = implementation(backend)
    ranges, cu, seq_len = words
    benchmark.extra_info.update(units=ranges.shape[0], tokens=16 * seq_len)
    benchmark(CALLS[op], ops, ranges, cu, seq_len)


@pytest.mark.parametrize("backend", ["C++ routed", "torch"])
def test_char_spans_to_token_ranges(benchmark, backend):
    from test_bench_units import BATCH, _encode, make_bpe_tokenizer, make_texts

    from mta_kernels.units import UnitExtractor

    implementation(backend)
    texts = make_texts()
    extractor = UnitExtractor()
    extractor.load()
    spans = [u.words for u in extractor(texts)]
    offsets = _encode(make_bpe_tokenizer(), texts)["offset_mapping"].to(torch.int64)
    benchmark.extra_info.update(
        texts=BATCH, units=sum(map(len, spans)), tokens=offsets.shape[0] * offsets.shape[1]
    )
    if backend == "torch":
        with _extension.use_fallback():
            benchmark(layout.char_spans_to_token_ranges, texts, offsets, spans)
    else:
        benchmark(layout.char_spans_to_token_ranges, texts, offsets, spans)
