"""The repository stands on its own: nothing refers to files outside it (links: tests/test_docs.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Built from pieces so that this file does not match itself.
OUTSIDE_REFERENCES = re.compile("|".join(["SP" + "EC", "PERF" + "-NOTES", r"\.\./sha" + "red"]))


def _tracked_files() -> list[Path]:
    try:
        cmd = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]


def _text_files() -> list[Path]:
    suffixes = {".py", ".md", ".sh", ".cpp", ".h", ".cu", ".cuh", ".toml", ".txt", ".cfg", ".yaml", ".yml"}
    names = {"Makefile", "run", "LICENSE"}
    return [p for p in _tracked_files() if p.suffix in suffixes or p.name in names]


def test_no_reference_to_files_outside_the_repository():
    hits = []
    for path in _text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_REFERENCES.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "references to files that are not in the repository:\n" + "\n".join(hits)


def test_the_method_and_the_licence_are_in_the_repository():
    assert (ROOT / "docs" / "method.md").is_file()
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0" in licence
