"""Test configuration: Triton runs in its CPU interpreter unless a GPU is present.

``TRITON_INTERPRET`` must be set before anything imports triton, so it is set here, at collection.
On a CUDA machine the same tests run the real kernels on the GPU (see ``tests/helpers.DEVICES``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tokenizers and the spaCy extractor, shared by the units and collator tests.
@pytest.fixture(scope="module")
def extractor():
    pytest.importorskip("spacy")
    from mta_kernels.units import UnitExtractor

    ex = UnitExtractor()
    ex.load()
    return ex


@pytest.fixture(scope="module")
def bpe():
    from tests.test_units import make_bpe_tokenizer

    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def wordpiece():
    from tests.test_units import make_wordpiece_tokenizer

    return make_wordpiece_tokenizer()
