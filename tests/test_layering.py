"""The package's layering (docs/DESIGN.md#layers-and-owners), checked on its source: ``mta_kernels/ops/``
is a closed layer (the backend is chosen inside it, nothing outside imports Triton or calls the ops'
extension ops except ``layout.py``), no module uses another module's private name, no module keeps a
registry keyed by tensor pointers, and long functions stay few. The counts come from
``tests/code_metrics.py`` (``python tests/code_metrics.py`` prints them with their places).

Each check is shown to fail on a planted offender (a copy of the tree with one line added), so that a
broken counter cannot pass silently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from code_metrics import (
    ROOT,
    backend_choices_outside_ops,
    long_functions,
    pointer_keyed_registries,
    private_cross_module_uses,
)

# Functions over 80 lines allowed (Triton kernels are not counted), the loop's argparse table among them.
MAX_LONG_FUNCTIONS = 3


def test_no_private_name_crosses_a_module():
    assert private_cross_module_uses() == []


def test_backends_are_chosen_inside_ops_only():
    assert backend_choices_outside_ops() == []


def test_no_pointer_keyed_registry():
    assert pointer_keyed_registries() == []


def test_few_long_functions():
    found = long_functions()
    assert len(found) <= MAX_LONG_FUNCTIONS, found


def test_losses_module_is_split_by_responsibility():
    lines = len((ROOT / "mta_kernels" / "losses.py").read_text().splitlines())
    assert lines <= 400, f"mta_kernels/losses.py has {lines} lines"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A copy of the package with one offender of each kind planted in it."""
    root = tmp_path_factory.mktemp("planted")
    shutil.copytree(
        ROOT / "mta_kernels", root / "mta_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    units = root / "mta_kernels" / "units.py"
    units.write_text(
        units.read_text()
        + "\n\nfrom mta_kernels.ops.span_pool import _check_ranges  # noqa\n"
        + "from mta_kernels.ops._triton import triton  # noqa\n"
        + "_SEEN = {}\n\n\ndef _remember(t):\n    _SEEN[t.data_ptr()] = t\n"
        + "\n\ndef _long():\n"
        + "    x = 1\n" * 90
    )
    return root


def test_the_counters_catch_planted_offenders(planted: Path):
    assert any("_check_ranges" in p for p in private_cross_module_uses(planted))
    assert any("units.py" in p and "_triton" in p for p in backend_choices_outside_ops(planted))
    assert any("_SEEN" in p for p in pointer_keyed_registries(planted))
    assert any("_long" in p for p in long_functions(planted))
