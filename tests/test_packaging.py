"""The sdist and the wheel, installed into fresh virtual environments that already have torch.

- The sdist, built from a copy of the checkout, holds every file of the C++ sources.
- The wheel built from it where torch is not importable (what pip's build isolation does) is pure
  Python and carries the C++ sources; ``pip install --no-index`` of it into a fresh environment installs
  nothing else (torch, numpy and ninja are already there: no second torch); from another folder the
  layout ops run the fallback when no compiler is found, with the extension's results, and compile on
  first use when one is (one compile, cached in a folder shared by the session; the next process loads it).
- ``pip install --no-build-isolation`` of the sdist, where torch is importable, builds ``_C`` ahead of time.

The environments see the packages of this one (torch included) through a ``.pth`` file pointing at a
folder of links to them, without this checkout's own install, so nothing is downloaded or reinstalled.
Slow (two compiles of the extension, ~1 min each on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from mta_kernels import _build_spec
from tests.test_extension_loading import OPS_SCRIPT, expected_ops

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
HIDE_TORCH = "import sys; sys.modules['torch'] = None  # as in pip's isolated build environment\n"
BUILD = HIDE_TORCH + "from setuptools import build_meta; print(build_meta.{}({!r}))"


def checkout_files() -> list[str]:
    cmd = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.splitlines() if (ROOT / p).is_file()]


def csrc_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in _build_spec.CSRC.rglob("*") if p.is_file()}


def run(cmd: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MTA_KERNELS_", "PIP_"))}
    environ.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **env)
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environ)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def reference_ops():
    return expected_ops()["ops"]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """Built from a copy of the checkout's files (no build products), torch hidden."""
    src = tmp_path_factory.mktemp("checkout")
    for rel in checkout_files():
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((ROOT / rel).read_bytes())
    out = tmp_path_factory.mktemp("dist")
    name = (
        run([sys.executable, "-c", BUILD.format("build_sdist", str(out))], src)
        .stdout.strip()
        .splitlines()[-1]
    )
    return out / name


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> tuple[Path, str]:
    """The wheel pip builds from the sdist in an isolated environment (no torch): pure Python."""
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    [src] = unpacked.iterdir()
    out = tmp_path_factory.mktemp("wheel")
    result = run([sys.executable, "-c", BUILD.format("build_wheel", str(out))], src)
    return out / result.stdout.strip().splitlines()[-1], result.stderr


@pytest.fixture(scope="module")
def visible_packages(tmp_path_factory) -> Path:
    """Links to every package of this environment's site folders except this checkout's install."""
    links = tmp_path_factory.mktemp("site-links")
    folders = []
    for i, site_dir in enumerate(p for p in map(Path, site.getsitepackages()) if p.is_dir()):
        folder = links / str(i)
        folder.mkdir()
        for entry in site_dir.iterdir():
            name = entry.name.lower()
            if name.startswith(("mta_kernels", "__editable__")) or name.endswith(".pth"):
                continue
            (folder / entry.name).symlink_to(entry)
        folders.append(str(folder))
    pth = links / "visible.pth"
    pth.write_text("\n".join(folders) + "\n")
    return pth


def fresh_venv(path: Path, visible_packages: Path) -> Path:
    venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    python = path / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], path).stdout
    (Path(purelib.strip()) / "visible-packages.pth").write_text(visible_packages.read_text())
    return python


def pip_install(python: Path, *args: str, **env: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--no-index",
        "--no-cache-dir",
        *args,
    ]
    return run(cmd, python.parent, **env).stdout


def ops_in(python: Path, cwd: Path, **env: str) -> tuple[dict, str]:
    result = run([str(python), "-c", OPS_SCRIPT], cwd, **env)
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_the_sdist_holds_every_file_of_the_cpp_sources(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = csrc_files() - names
    assert not missing, f"the sdist lacks {sorted(missing)}"
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "mta_kernels/_build_spec.py"} <= names
    assert not [n for n in names if n.endswith((".so", ".o")) or n.endswith(_build_spec.RECORD_NAME)]


def test_the_wheel_built_without_torch_is_pure_and_carries_the_sources(wheel):
    path, log = wheel
    assert path.name.endswith("-py3-none-any.whl"), path.name
    assert "torch is not importable in this build environment" in log
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
        metadata = whl.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert csrc_files() <= names and not [n for n in names if n.endswith(".so")]
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert "Requires-Dist: torch>=2.4" in requires and not [
        r for r in requires if "triton" in r and "extra" not in r
    ]


def test_the_wheel_in_a_fresh_environment(wheel, visible_packages, reference_ops, tmp_path, tmp_path_factory):
    python = fresh_venv(tmp_path / "venv", visible_packages)
    out = pip_install(python, str(wheel[0]))
    assert re.search(r"Installing collected packages: mta[-_]kernels\n", out), (
        out
    )  # torch, numpy, ninja: there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(
        [str(python), "-c", "import mta_kernels, torch; print(mta_kernels.__file__, torch.__file__)"],
        elsewhere,
    )
    package, torch_file = where.stdout.split()
    assert (
        package.startswith(str(tmp_path / "venv"))
        and Path(torch_file).resolve() == Path(__import__("torch").__file__).resolve()
    )
    cache = tmp_path_factory.getbasetemp() / "jit-cache"  # one cache folder for the session
    no_compiler = {"CXX": "/nonexistent/g++", "MTA_KERNELS_CACHE": str(tmp_path / "empty-cache")}
    info = run([str(python), "-m", "mta_kernels.info"], elsewhere, **no_compiler).stdout
    assert "extension    pure-torch fallback" in info and "prebuilt     none" in info
    # No compiler: the fallback, one warning, the extension's results.
    result, _ = ops_in(python, elsewhere, **no_compiler)
    assert result["kind"] == "torch" and result["ops"] == reference_ops
    assert len(result["warnings"]) == 1 and "no C++ compiler" in result["warnings"][0]
    # A compiler: compiled on first use, announced in one line before and one after.
    info = run([str(python), "-m", "mta_kernels.info"], elsewhere, MTA_KERNELS_CACHE=str(cache)).stdout
    assert "extension    compiled on first use: not compiled yet, compiles at the first layout op" in info
    result, err = ops_in(python, elsewhere, MTA_KERNELS_CACHE=str(cache))
    assert result["kind"] == "jit" and result["warnings"] == [] and result["ops"] == reference_ops
    lines = [line for line in err.splitlines() if line.startswith("mta_kernels: ") and "..." not in line]
    assert (
        lines[0].startswith("mta_kernels: compiling the C++ extension for torch") and str(cache) in lines[0]
    )
    assert lines[-1].startswith("mta_kernels: compiled the C++ extension in ")
    # The next process loads the cached build; `python -m mta_kernels.build` finds it there.
    result, err = ops_in(python, elsewhere, MTA_KERNELS_CACHE=str(cache))
    assert result["kind"] == "jit" and "compiling" not in err and result["ops"] == reference_ops
    built = run([str(python), "-m", "mta_kernels.build"], elsewhere, MTA_KERNELS_CACHE=str(cache)).stdout
    assert "is ready (already in the cache)" in built


def test_the_sdist_with_torch_at_build_time_builds_ahead(sdist, visible_packages, reference_ops, tmp_path):
    python = fresh_venv(tmp_path / "venv", visible_packages)
    out = pip_install(python, "--no-build-isolation", str(sdist), MAX_JOBS="2")
    assert re.search(r"Installing collected packages: mta[-_]kernels\n", out), out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result, err = ops_in(python, elsewhere, MTA_KERNELS_CACHE=str(tmp_path / "empty-cache"))
    assert result["kind"] == "prebuilt" and result["ops"] == reference_ops and "compiling" not in err
    library = run(
        [str(python), "-c", "from mta_kernels import layout; print(layout.extension_path())"], elsewhere
    )
    so = Path(library.stdout.strip())
    record = _build_spec.read_record(so.with_name(_build_spec.RECORD_NAME))
    assert so.is_file() and record["torch"] == __import__("torch").__version__
    assert so.stat().st_size < 2_000_000, f"{so.stat().st_size} bytes: debug info? (built with -g0)"
