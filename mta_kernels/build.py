"""``python -m mta_kernels.build``: compile the C++ extension ahead of its first use.

For clusters whose compute nodes have no compiler (build once on a login node into a shared cache:
``MTA_KERNELS_CACHE=/shared/cache python -m mta_kernels.build``, and set the same variable for the
jobs), or to warm the cache before a multi-process launch. The build goes to the cache folder of the
installed torch (``mta_kernels._jit``); a build that is there already is reused unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys

from mta_kernels import _extension, _jit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mta_kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="cache folder (default: $MTA_KERNELS_CACHE, else the user cache)")
    parser.add_argument("--force", action="store_true", help="compile again even if the cache has the build")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    if args.cache:
        os.environ["MTA_KERNELS_CACHE"] = os.path.abspath(args.cache)
    loaded = _extension.state()
    if loaded is not None and loaded.path is not None:  # a second library of the same ops aborts torch
        print(
            f"mta_kernels: an extension is loaded in this process already ({loaded.path}); run "
            "`python -m mta_kernels.build` in a new process",
            file=sys.stderr,
        )
        return 1
    try:
        built = _jit.build(verbose=args.verbose, force=args.force)
    except _jit.BuildUnavailable as exc:
        print(f"mta_kernels: cannot compile the C++ extension: {exc}", file=sys.stderr)
        if exc.toolchain:
            print(f"mta_kernels: {_extension.INSTALL_HINT}", file=sys.stderr)
        return 1
    how = f"compiled in {built.seconds:.0f} s" if built.seconds is not None else "already in the cache"
    print(
        f"mta_kernels: the C++ extension for torch {built.record.get('torch')} is ready ({how}): "
        f"{built.library}"
    )
    library = _extension.prebuilt_library()
    if library is not None and _extension.prebuilt_problem(library) is None:
        print(
            "mta_kernels: note: this package also has a prebuilt extension that matches this torch; it is "
            "loaded first (MTA_KERNELS_EXT=jit selects the cached build)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
