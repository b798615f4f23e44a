"""Atomic writes: every file and folder the pipeline makes appears whole or not at all.

A file is written under a temporary name in its own folder (``.<name>.<pid>.tmp``: hidden, and a
later writer can tell whether its owner still runs), flushed to disk, then renamed over the target,
and the folder's entry is flushed too; a crash at any moment leaves the old file or the new one.
A folder (an export, a converted backbone) is built under a temporary name beside its target and
renamed into place the same way. Cache parts and manifests, heads, exports, scores, benchmark
results and generated datasets all go through here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def temp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under: hidden, in the same folder, tagged with our pid."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)``, fsync ``tmp``, rename it over ``path``, fsync the folder; returns ``path``.

    On any failure (Ctrl-C included) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value, indent: int | None = 2) -> Path:
    """``path`` holds ``value`` as strict JSON (NaN and infinities written as null), atomically."""
    return write_text(path, json.dumps(finite(value), indent=indent, allow_nan=False) + "\n")


def finite(value):
    """``value`` with every NaN / infinite float replaced by None, in nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; on success it replaces ``out``.

    An existing ``out`` is moved aside first and removed only once the new folder is in place; on
    failure the temporary folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        _fsync(out.parent, os.O_RDONLY)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
