"""How the layout ops find an implementation (mta_kernels/_extension.py, mta_kernels/_jit.py): the
prebuilt extension, the build compiled on first use, or the pure-torch fallback; MTA_KERNELS_EXT; the
build record; the cache; the cross-process build lock.

Each scenario runs in a fresh Python process, on a copy of the package without its prebuilt ``_C`` (what a
wheel built in pip's build isolation installs) unless it says otherwise, with ``CXX`` pointing at a missing
program and an empty cache, so nothing is compiled here. The real compile is in tests/test_packaging.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mta_kernels import _build_spec, _extension, _jit, layout

ROOT = Path(__file__).resolve().parent.parent
NO_COMPILER = "/nonexistent/bin/g++"

# A few layout-op calls whose results the scenarios print (as JSON) for comparison with this process.
OPS_SCRIPT = """
import json, sys, warnings
import torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from mta_kernels import layout
    ranges = torch.tensor([[0, 2], [3, 5], [10, 12], [12, 17]], dtype=torch.int32)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    layout.validate_layout(ranges, cu, 20, 10)
    try:
        layout.validate_layout(torch.tensor([[0, 4], [3, 5]], dtype=torch.int32), cu[:2], 10, 10)
        error = None
    except ValueError as exc:
        error = str(exc)
    spans = layout.char_spans_to_token_ranges(
        ["a cat sat", "on  mats"], torch.tensor([[[0, 1], [1, 5], [5, 9]], [[0, 2], [2, 4], [4, 8]]]),
        [[(0, 1), (2, 5), (6, 9)], [(0, 2), (4, 8)]])
    out = {
        "token_to_unit": layout.token_to_unit(ranges, 20).tolist(),
        "unit_to_seq": layout.unit_to_seq(cu).tolist(),
        "offsets": layout.offsets_from_lengths(torch.tensor([2, 0, 3])).tolist(),
        "work": layout.block_diagonal_work_list(cu, 2).tolist(),
        "spans": spans.tolist(),
        "error": error,
    }
from mta_kernels import _extension
state = _extension.state()
print(json.dumps({
    "ops": out, "kind": state.kind, "notes": state.notes,
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    "loaded_C": "mta_kernels._C" in sys.modules,
}))
"""


def expected_ops() -> dict:
    """OPS_SCRIPT's results in this process (the prebuilt extension)."""
    out = subprocess.run([sys.executable, "-c", OPS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference_ops():
    result = expected_ops()
    assert result["kind"] == "prebuilt" and result["warnings"] == [], result
    return result["ops"]


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    """The package as a wheel built without torch installs it: the Python files and csrc, no _C."""
    dest = tmp_path_factory.mktemp("site") / "mta_kernels"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", _build_spec.RECORD_NAME)
    shutil.copytree(ROOT / "mta_kernels", dest, ignore=ignore)
    return dest.parent


# This checkout is installed in editable mode, whose import hook would find the repository's _C for the
# package copy too: the scenarios on the copy drop that hook first.
NO_EDITABLE_HOOK = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
)


def run(code: str, site: Path | None, tmp_path: Path, timeout: float = 300, **env: str):
    """``python -c code`` in ``tmp_path`` with ``site`` first on sys.path, CXX missing, an empty cache."""
    code = textwrap.dedent(code)
    if site is not None:
        code = NO_EDITABLE_HOOK + code
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MTA_KERNELS_")}
    environ.update(CXX=NO_COMPILER, MTA_KERNELS_CACHE=str(tmp_path / "cache"), **env)
    if site is not None:
        environ["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=environ,
    )


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- importing
def test_importing_never_loads_nor_compiles(package_copy, tmp_path):
    code = """
    import sys, warnings
    warnings.simplefilter("error")
    import mta_kernels.reference
    import mta_kernels, mta_kernels.layout, mta_kernels.losses
    from mta_kernels import _extension
    assert _extension.state() is None and "mta_kernels._C" not in sys.modules
    print(mta_kernels.__file__)
    """
    for site in (package_copy, None):  # without _C, and the repository's package with it
        result = run(code, site, tmp_path)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        expected = package_copy if site else ROOT
        assert result.stdout.strip().startswith(str(expected)), result.stdout


# --------------------------------------------------------------------------------------- fallback
def test_no_compiler_runs_the_fallback_with_the_same_results(package_copy, tmp_path, reference_ops):
    result = last_json(run(OPS_SCRIPT, package_copy, tmp_path))
    assert result["kind"] == "torch" and not result["loaded_C"]
    assert result["ops"] == reference_ops
    [warning] = result["warnings"]  # exactly one, saying why and what to install
    assert warning.startswith("ExtensionFallbackWarning: mta_kernels: the layout ops run in plain torch")
    assert (
        "no C++ compiler" in warning and NO_COMPILER in warning and "python -m mta_kernels.build" in warning
    )
    assert "\n" not in warning
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_info_names_the_state_without_loading(package_copy, tmp_path):
    result = run("import mta_kernels.info as i; i.main(); i.main(['--json'])", package_copy, tmp_path)
    assert result.returncode == 0, result.stderr
    report, facts = result.stdout.split("\n{", 1)
    facts = json.loads("{" + facts)
    assert "extension    pure-torch fallback" in report and "NOT FOUND" in report
    assert "no C++ compiler" in report and "prebuilt     none" in report
    assert facts["extension"]["state"] == "torch" and facts["extension"]["loaded"] is False
    assert facts["backends"]["layout ops"]["cpu"] == "torch (fallback)"
    assert facts["cache"] == str(tmp_path / "cache") and facts["torch"] == torch.__version__
    # `python -m` works, and mta_kernels.info() is callable.
    cli = run(
        "import runpy; runpy.run_module('mta_kernels.info', run_name='__main__')", package_copy, tmp_path
    )
    assert "pure-torch fallback" in cli.stdout, cli.stdout + cli.stderr
    call = run("import mta_kernels as mk; print(mk.info()['extension']['state'])", package_copy, tmp_path)
    assert call.stdout.strip() == "torch", call.stderr


def test_forced_modes(package_copy, tmp_path, reference_ops):
    first_op = (
        "import torch; from mta_kernels import layout; layout.unit_to_seq(torch.zeros(1, dtype=torch.int32))"
    )
    prebuilt = run(first_op, package_copy, tmp_path, MTA_KERNELS_EXT="prebuilt")
    assert prebuilt.returncode != 0 and "ExtensionUnavailable: MTA_KERNELS_EXT=prebuilt" in prebuilt.stderr
    assert "no prebuilt extension" in prebuilt.stderr
    jit = run(first_op, package_copy, tmp_path, MTA_KERNELS_EXT="jit")
    assert (
        jit.returncode != 0
        and "MTA_KERNELS_EXT=jit: the extension cannot be compiled: no C++ compiler" in jit.stderr
    )
    bogus = run(first_op, package_copy, tmp_path, MTA_KERNELS_EXT="fast")
    assert "MTA_KERNELS_EXT must be one of auto, prebuilt, jit, torch, got 'fast'" in bogus.stderr
    # torch: the fallback without a warning, even where the prebuilt extension exists (never loaded).
    forced = last_json(run(OPS_SCRIPT, None, tmp_path, MTA_KERNELS_EXT="torch"))
    assert forced["kind"] == "torch" and forced["warnings"] == [] and not forced["loaded_C"]
    assert forced["ops"] == reference_ops
    # prebuilt: the repository's _C.
    assert last_json(run(OPS_SCRIPT, None, tmp_path, MTA_KERNELS_EXT="prebuilt"))["kind"] == "prebuilt"


# ------------------------------------------------------------------------------------ build record
def copy_with_prebuilt(package_copy: Path, tmp_path: Path, library: bytes, record: dict) -> Path:
    site = tmp_path / "site"
    shutil.copytree(package_copy, site)
    prebuilt = _extension.prebuilt_library()
    (site / "mta_kernels" / prebuilt.name).write_bytes(library)
    _build_spec.write_record(site / "mta_kernels" / _build_spec.RECORD_NAME, record)
    return site


def test_a_prebuilt_for_another_torch_is_not_loaded_and_reported_in_one_line(package_copy, tmp_path):
    record = _build_spec.build_record(with_cuda=False) | {"torch": "2.1.0"}
    site = copy_with_prebuilt(package_copy, tmp_path, _extension.prebuilt_library().read_bytes(), record)
    result = last_json(run(OPS_SCRIPT, site, tmp_path))
    assert result["kind"] == "torch" and not result["loaded_C"]  # never dlopen'ed: no undefined symbol
    [warning] = result["warnings"]
    assert f"it was built for torch 2.1.0, you have {torch.__version__}" in warning and "\n" not in warning
    forced = run(OPS_SCRIPT, site, tmp_path, MTA_KERNELS_EXT="prebuilt")
    assert f"it was built for torch 2.1.0, you have {torch.__version__}" in forced.stderr.splitlines()[-1]


def test_a_broken_prebuilt_library_is_reported_not_fatal(package_copy, tmp_path, reference_ops):
    record = _build_spec.build_record(with_cuda=False)
    site = copy_with_prebuilt(package_copy, tmp_path, b"not an ELF file", record)
    result = last_json(run(OPS_SCRIPT, site, tmp_path))
    assert result["kind"] == "torch" and result["ops"] == reference_ops
    [warning] = result["warnings"]
    assert "is not used: it could not be loaded (" in warning and "no C++ compiler" in warning


def test_sources_changed_after_the_build_is_a_mismatch(monkeypatch):
    record = _build_spec.build_record(with_cuda=False)
    assert _build_spec.record_problem(record) is None
    monkeypatch.setattr(_build_spec, "sources_hash", lambda: "0" * 64)
    assert _build_spec.record_problem(record) == "it was built from other C++ sources than the installed ones"
    assert _build_spec.record_problem(None) == "it has no build record"


# ------------------------------------------------------------------------------------------ cache
def test_cache_folder_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MTA_KERNELS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _jit.cache_root() == tmp_path / "home" / ".cache" / "mta_kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _jit.cache_root() == tmp_path / "xdg" / "mta_kernels"
    monkeypatch.setenv("MTA_KERNELS_CACHE", str(tmp_path / "mine"))
    assert _jit.cache_root() == tmp_path / "mine"


def test_cache_key_changes_with_torch_cuda_flags_and_sources(monkeypatch):
    key = _build_spec.cache_key(with_cuda=False)
    assert key.startswith(f"torch{torch.__version__}-cpu-{sys.implementation.cache_tag}-")
    assert _build_spec.cache_key(with_cuda=False) == key  # stable
    changes = [
        lambda: monkeypatch.setattr(torch, "__version__", "2.99.0"),
        lambda: monkeypatch.setattr(torch.version, "cuda", "12.8"),
        lambda: monkeypatch.setattr(_build_spec, "CXX_FLAGS", ("-O2", "-g0")),
        lambda: monkeypatch.setattr(_build_spec, "sources_hash", lambda: "f" * 64),
    ]
    for change in changes:
        change()
        assert _build_spec.cache_key(with_cuda=False) != key
        monkeypatch.undo()
    assert _build_spec.cache_key(with_cuda=True) != key


def test_an_unusable_cache_or_cached_build_is_one_line(monkeypatch, tmp_path):
    """A cache folder that cannot be created, a cached library that cannot be loaded: BuildUnavailable
    (the fallback in auto mode), with what to do."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("MTA_KERNELS_CACHE", str(not_a_folder))
    monkeypatch.setattr(_jit, "toolchain_problem", lambda: None)
    with pytest.raises(_jit.BuildUnavailable, match="the cache folder .* is not usable .*MTA_KERNELS_CACHE"):
        _jit.build()
    monkeypatch.setenv("MTA_KERNELS_CACHE", str(tmp_path / "cache"))
    folder = _jit.build_folder(_build_spec.want_cuda())
    folder.mkdir(parents=True)
    (folder / _jit.LIBRARY).write_bytes(b"not a library")
    _build_spec.write_record(folder / _jit.RECORD, {"torch": torch.__version__})
    with pytest.raises(_jit.BuildUnavailable, match=r"could not be loaded .*mta_kernels.build --force"):
        _jit.build()


def test_an_unusable_cache_is_named_and_not_blamed_on_the_compiler(tmp_path):
    """``info`` says the cache folder cannot take a build (not "compiles at the first layout op"); the
    build command names the folder and gives no compiler advice when a compiler is there."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    env = {**os.environ, "MTA_KERNELS_CACHE": str(not_a_folder), "MTA_KERNELS_EXT": "jit"}
    code = "from mta_kernels import info; print(info.info()['extension'].get('error'))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert f"{not_a_folder} is not usable ({not_a_folder} is a file)" in run.stdout
    if _jit.toolchain_problem() is None:
        build = subprocess.run(
            [sys.executable, "-m", "mta_kernels.build", "--cache", str(not_a_folder)],
            env={k: v for k, v in env.items() if k != "MTA_KERNELS_EXT"},
            capture_output=True,
            text=True,
        )
        assert build.returncode == 1 and "is not usable" in build.stderr
        assert "C++ compiler" not in build.stderr


# ------------------------------------------------------------------------------------------- lock
BUILDER = """
import os, sys, time
from pathlib import Path
from mta_kernels import _jit
folder, mode = Path(sys.argv[1]), sys.argv[2]
folder.parent.mkdir(parents=True, exist_ok=True)
ready = folder.parent / f"ready-{os.getpid()}"
ready.touch()
while len(list(folder.parent.glob("ready-*"))) < int(sys.argv[3]):  # all processes start together
    time.sleep(0.05)

def compile_fn(dest):
    with open(folder.parent / "compiles", "a") as f:
        f.write(f"{os.getpid()}\\n")
    if mode == "hang":  # a build that gets killed: torch's lock file and a half-written object
        (dest / "lock").touch()
        (dest / "half.o").write_bytes(b"partial")
        (folder.parent / "started").touch()
        time.sleep(600)
    time.sleep(1.5)
    (dest / _jit.LIBRARY).write_bytes(b"library")

built = _jit.ensure_built(folder, compile_fn, lambda: {"fake": True}, "compiling (fake)")
print("built", built.library.read_bytes().decode(), built.seconds is not None)
"""


def start_builders(tmp_path: Path, mode: str, count: int) -> list[subprocess.Popen]:
    folder = tmp_path / "cache" / "key"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MTA_KERNELS_")}
    return [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(folder), mode, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=environ,
        )
        for _ in range(count)
    ]


def test_processes_starting_together_build_once(tmp_path):
    procs = start_builders(tmp_path, "ok", 3)
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert len((tmp_path / "cache" / "compiles").read_text().split()) == 1  # one compile for three
    stdouts = sorted(out for out, _ in outputs)
    assert stdouts == ["built library False\n", "built library False\n", "built library True\n"], stdouts
    stderr = "".join(err for _, err in outputs)
    assert stderr.count("compiling (fake)") == 1 and stderr.count("waiting for process") == 2, stderr
    assert (tmp_path / "cache" / "key" / _jit.RECORD).is_file()


def test_a_killed_build_is_detected_and_cleared(tmp_path):
    [hung] = start_builders(tmp_path, "hang", 1)
    deadline = time.monotonic() + 120
    while not (tmp_path / "cache" / "started").exists():
        assert time.monotonic() < deadline and hung.poll() is None, hung.communicate()
        time.sleep(0.1)
    os.kill(hung.pid, signal.SIGKILL)
    hung.communicate()
    folder = tmp_path / "cache" / "key"
    assert (folder / "lock").exists() and not (folder / _jit.RECORD).exists()
    for ready in (tmp_path / "cache").glob("ready-*"):
        ready.unlink()
    [again] = start_builders(tmp_path, "ok", 1)
    out, err = again.communicate(timeout=120)  # torch's own lock file would make torch wait forever
    assert again.returncode == 0 and out == "built library True\n", err
    assert f"a previous build (process {hung.pid} on" in err and "was interrupted" in err
    assert not (folder / "half.o").exists() and not (folder / "lock").exists()


def test_a_failed_compile_is_one_line_with_a_log(tmp_path):
    def failing(dest):
        raise RuntimeError(
            "Error building extension\n[1/6] c++ ...\nsegments_cpu.cpp:3:1: error: expected ';'\n"
        )

    with pytest.raises(_jit.BuildUnavailable) as info:
        _jit.ensure_built(tmp_path / "key", failing, dict, "compiling (fails)")
    message = str(info.value)
    assert "\n" not in message and "the compile failed: segments_cpu.cpp:3:1: error: expected ';'" in message
    log = tmp_path / "key" / "build.log"
    assert str(log) in message and "[1/6] c++" in log.read_text()
    assert not _jit.is_complete(tmp_path / "key")


def test_the_state_of_this_process():
    """The test session itself runs the prebuilt extension (what `make setup` built)."""
    if _extension.mode() != "auto":
        pytest.skip("MTA_KERNELS_EXT forces another choice")
    layout.extension_path()
    current = _extension.state()
    assert current.kind == "prebuilt" and current.notes == [] and current.record["torch"] == torch.__version__
