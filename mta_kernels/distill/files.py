"""Reading the user's text files (data, ``--config``, recipes): one clear error for each way it fails.

Missing, a directory or another non-regular file, unreadable (permissions), too large for what it is,
binary (NUL bytes), UTF-16, or not UTF-8: each is a
:class:`~mta_kernels.distill.config.DistillError` naming the option and the file, never a traceback.
A UTF-8 byte-order mark at the start is skipped (editors on Windows write one).
"""

from __future__ import annotations

import codecs
import io
import os
import stat

from mta_kernels.distill.config import DistillError

UTF8_BOM = codecs.BOM_UTF8.decode("utf-8")


def read_text(path: str, what: str, max_bytes: int | None = None) -> str:
    """The content of a UTF-8 text file (a leading byte-order mark removed).

    Args:
        path: the file.
        what: how the error names it, e.g. ``"--config file"`` or ``"data file"``.
        max_bytes: a larger file is an error (``None``: any size).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DistillError(f"{what} {path!r} does not exist") from None
    except OSError as exc:
        raise DistillError(f"{what} {path!r} cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise DistillError(f"{what} {path!r} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise DistillError(f"{what} {path!r} is not a regular file (a device, pipe or socket)")
    if max_bytes is not None and info.st_size > max_bytes:
        raise DistillError(
            f"{what} {path!r} has {info.st_size} bytes, more than the {max_bytes} such a file can have: "
            "is it the right file?"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DistillError(f"{what} {path!r} cannot be read ({exc.strerror})") from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DistillError(f"{what} {path!r} is UTF-16 text: save it as UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DistillError(f"{what} {path!r} holds NUL bytes (at byte {nul}): a binary file, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DistillError(f"{what} {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text[1:] if text.startswith(UTF8_BOM) else text


def starts_with_bom(path: str) -> bool:
    """Whether a file starts with a UTF-8 byte-order mark (:func:`read_text` skips it)."""
    try:
        with open(path, "rb") as f:
            return f.read(3) == codecs.BOM_UTF8
    except OSError:
        return False


def text_lines(text: str) -> list[str]:
    """Lines as Python's text files give them: ``\\n``, ``\\r\\n`` and ``\\r`` end a line (read as
    ``\\n``), nothing else does (``str.splitlines`` would also split at U+2028 inside a JSON string)."""
    return io.StringIO(text, newline=None).readlines()
