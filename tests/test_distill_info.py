"""``mta-distill`` says what runs the ops: one line at start-up, all of ``mta_kernels.info()`` in the run's
``config.json``."""

from __future__ import annotations

import json

import pytest

from mta_kernels.distill.__main__ import main
from tests.test_distill import _distill_args, make_assets

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_start_up_line_and_run_metadata(tmp_path, capsys):
    assets = make_assets(tmp_path / "assets")
    out = tmp_path / "run"
    assert main(_distill_args(assets, out, steps=1, batch=4)) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("mta_kernels 0.1.0 | torch ") and " | C++ extension: " in first, first
    info = json.loads((out / "config.json").read_text())["mta_kernels"]
    assert info["mta_kernels"] == "0.1.0" and info["torch"] and info["extension"]["loaded"] is True
    assert info["backends"]["layout ops"]["cpu"].startswith("C++") and info["extension"]["built_for"]
