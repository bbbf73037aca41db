"""The documentation's cross-references resolve: every ``docs/method.md#<section>`` named anywhere in the
repository is a heading of docs/method.md, and every relative link of the Markdown files points to a file
that exists (and, with an anchor into a Markdown file, to one of its headings)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"

# Sections the code links to (docs/method.md is their one home).
REQUIRED_ANCHORS = [
    "what-mta-is",
    "semantic-units",
    "mapping-units-to-tokens",
    "packed-layout",
    "token-saliency",
    "span-pooling",
    "dsa-loss",
    "hra-loss",
    "the-objective",
    "layer-presets",
    "deviations-from-the-published-code",
    "numerical-tolerance-rule",
    "public-api",
]
SOURCE_SUFFIXES = {".py", ".md", ".h", ".cpp", ".cu", ".sh", ".toml"}
SKIP_DIRS = {".git", ".venv", "build", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache"}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors of every heading outside fenced code blocks (repeats get -1, -2, ... as on GitHub)."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m:
            a = github_anchor(m.group(1))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def repository_files() -> list[Path]:
    files = []
    for p in ROOT.rglob("*"):
        if p.is_file() and p.suffix in SOURCE_SUFFIXES and not SKIP_DIRS & set(p.relative_to(ROOT).parts):
            files.append(p)
    return files


def test_github_anchor_rule():
    assert github_anchor("Deviations from the published code") == "deviations-from-the-published-code"
    assert github_anchor("DSA loss") == "dsa-loss"
    assert github_anchor("Semantic units: extraction (`units.py`)") == "semantic-units-extraction-unitspy"


def test_method_has_the_anchors_the_code_links_to():
    missing = sorted(set(REQUIRED_ANCHORS) - anchors(METHOD))
    assert not missing, f"docs/method.md lacks the sections {missing}"


def test_every_method_reference_resolves():
    have = anchors(METHOD)
    bad = []
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"method\.md#([A-Za-z0-9_\-]+)", text):
            if m.group(1) not in have:
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"{path.relative_to(ROOT)}:{line}: #{m.group(1)}")
    assert not bad, "references to missing sections of docs/method.md:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "doc", sorted(str(p.relative_to(ROOT)) for p in repository_files() if p.suffix == ".md")
)
def test_markdown_relative_links_resolve(doc):
    path = ROOT / doc
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{doc}: broken links: {bad}"
