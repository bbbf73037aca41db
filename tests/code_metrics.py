"""Structural counts of the package's code (docs/DESIGN.md#layers-and-owners), computed from its source.

Used by ``tests/test_layering.py``; ``python tests/code_metrics.py [ROOT]`` prints every count and the
places behind it for the tree at ROOT (default: this checkout).

- private cross-module uses: ``from mta_kernels.x import _name`` and ``x._name`` (``x`` an imported
  module of the package) where ``_name`` is a private name of another module (not a submodule);
- backend choices outside ``mta_kernels/ops/``: a call of ``use_triton``, ``triton_interpreting`` or a
  wrapper of them, ``torch.compiler.is_compiling()``, a read of ``HAS_TRITON``, an import of Triton or of
  the ops' backend modules, or a call of an extension op ``torch.ops.mta_kernels.*``; ``layout.py``, the
  face of the extension, may call its ops and skip the layout plan's host-side check while
  torch.compile traces (``is_compiling``: no backend is chosen there);
- pointer-keyed registries: module-level containers filled at run time in a module that reads tensors'
  ``data_ptr()``;
- functions longer than 80 lines, Triton kernels (``@triton.jit``) excepted.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mta_kernels"
# Names whose call or read chooses a backend (the ops' dispatch rule and its inputs).
_CHOICE_CALLS = {"use_triton", "triton_interpreting", "is_compiling", "_eager_triton"}
_CHOICE_NAMES = {"HAS_TRITON"}
_BACKEND_MODULES = ("triton", f"{PACKAGE}._triton", f"{PACKAGE}._dispatch", f"{PACKAGE}.ops._triton")
_BACKEND_MODULES += (f"{PACKAGE}.ops._dispatch",)
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Module:
    name: str  # dotted module name
    path: Path
    tree: ast.Module

    @property
    def rel(self) -> str:
        return self.path.relative_to(self.path.parents[len(self.name.split(".")) - 1]).as_posix()


def modules(root: Path = ROOT) -> list[Module]:
    """Every ``.py`` file of the package under ``root``, parsed."""
    out = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(Module(".".join(parts), path, ast.parse(path.read_text(), str(path))))
    return out


def _is_submodule(root: Path, dotted: str) -> bool:
    if dotted == f"{PACKAGE}._C":  # the compiled extension (built from csrc/, maybe not built here)
        return True
    base = root / Path(*dotted.split("."))
    if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
        return True
    return any(base.parent.glob(f"{base.name}.*.so"))


def _imported_modules(mod: Module, root: Path) -> dict[str, str]:
    """Local name -> dotted module, for the package's modules that ``mod`` imports as modules."""
    names = {}
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            for a in node.names:
                if _is_submodule(root, f"{node.module}.{a.name}"):
                    names[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE) and a.asname:
                    names[a.asname] = a.name
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_cross_module_uses(root: Path = ROOT) -> list[str]:
    """``file:line module._name`` for every use of another module's private name."""
    found = []
    for mod in modules(root):
        local = _imported_modules(mod, root)
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                for a in node.names:
                    dotted = f"{node.module}.{a.name}"
                    if _private(a.name) and not _is_submodule(root, dotted) and node.module != mod.name:
                        found.append(f"{mod.rel}:{node.lineno} imports {dotted}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = local.get(node.value.id)
                if target and target != mod.name and _private(node.attr):
                    found.append(f"{mod.rel}:{node.lineno} uses {target}.{node.attr}")
    return found


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _outside_ops(mod: Module) -> bool:
    return not mod.name.startswith(f"{PACKAGE}.ops") and mod.name not in (
        f"{PACKAGE}._dispatch",
        f"{PACKAGE}._triton",
    )


def backend_choices_outside_ops(root: Path = ROOT) -> list[str]:
    """``file:line what`` for every line outside ``ops/`` that chooses a backend (see the docstring)."""
    found = []
    for mod in filter(_outside_ops, modules(root)):
        is_layout = mod.name == f"{PACKAGE}.layout"
        for node in ast.walk(mod.tree):
            what = None
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name.split(".")[-1] in _CHOICE_CALLS and not (is_layout and name.endswith("is_compiling")):
                    what = f"calls {name}"
                elif name.startswith("torch.ops.mta_kernels.") and not is_layout:
                    what = f"calls {name}"
            elif isinstance(node, ast.FunctionDef) and node.name in _CHOICE_CALLS:
                what = f"defines {node.name}"
            elif isinstance(node, ast.Name) and node.id in _CHOICE_NAMES and isinstance(node.ctx, ast.Load):
                what = f"reads {node.id}"
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(_BACKEND_MODULES):
                names = [a.name for a in node.names if a.name != "use_backend"]
                if names:
                    what = f"imports {', '.join(names)} from {node.module}"
            elif isinstance(node, ast.Import) and any(a.name.startswith("triton") for a in node.names):
                what = "imports triton"
            if what:
                found.append((mod.rel, node.lineno, what))
    lines: dict[tuple[str, int], list[str]] = {}
    for rel, line, what in found:
        lines.setdefault((rel, line), []).append(what)
    return [f"{rel}:{line} {'; '.join(whats)}" for (rel, line), whats in sorted(lines.items())]


def pointer_keyed_registries(root: Path = ROOT) -> list[str]:
    """``file:line NAME``: module-level containers filled at run time in a module reading ``data_ptr()``."""
    found = []
    for mod in modules(root):
        reads_pointers = any(
            isinstance(n, ast.Call) and _dotted(n.func).endswith(".data_ptr") for n in ast.walk(mod.tree)
        )
        if not reads_pointers:
            continue
        for node in mod.tree.body:
            target = value = None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign):
                target, value = node.target, node.value
            mutable = isinstance(value, (ast.Dict, ast.List, ast.Set)) or (
                isinstance(value, ast.Call) and _dotted(value.func) in ("dict", "list", "set", "OrderedDict")
            )
            if isinstance(target, ast.Name) and mutable and target.id in _filled_at_run_time(mod.tree):
                found.append(f"{mod.rel}:{node.lineno} {target.id}")
    return found


_MUTATORS = {"insert", "append", "pop", "popitem", "clear", "update", "setdefault", "add", "extend"}


def _filled_at_run_time(tree: ast.Module) -> set[str]:
    """Module-level names that a function stores into (``x[k] = ...``, ``del x[k]``, ``x.append`` ...)."""
    names = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
                if isinstance(node.value, ast.Name):
                    names.add(node.value.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.attr in _MUTATORS:
                    names.add(node.value.id)
    return names


def _is_triton_kernel(fn: ast.FunctionDef) -> bool:
    return any(_dotted(d.func if isinstance(d, ast.Call) else d) == "triton.jit" for d in fn.decorator_list)


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (N lines)`` for every function over ``limit`` lines (docstring included), Triton
    kernels excepted."""
    found = []
    for mod in modules(root):
        for node in ast.walk(mod.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{mod.rel}:{node.lineno} {node.name} ({n} lines)")
    return found


def line_count(root: Path, rel: str) -> int:
    return len((root / rel).read_text().splitlines())


def main(argv: list[str]) -> None:
    root = Path(argv[1]).resolve() if len(argv) > 1 else ROOT
    for title, items in (
        ("private cross-module uses", private_cross_module_uses(root)),
        ("backend choices outside mta_kernels/ops/", backend_choices_outside_ops(root)),
        ("pointer-keyed registries", pointer_keyed_registries(root)),
        (f"functions over {MAX_FUNCTION_LINES} lines (Triton kernels excepted)", long_functions(root)),
    ):
        print(f"{title}: {len(items)}")
        for item in items:
            print(f"    {item}")
    print(f"lines of mta_kernels/losses.py: {line_count(root, 'mta_kernels/losses.py')}")


if __name__ == "__main__":
    main(sys.argv)
