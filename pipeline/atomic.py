"""Atomic writes: every file and folder the pipeline makes appears whole or not at all.

One naming rule for what is being written (``temp_path``): a hidden sibling of the target,
``.<name>.<pid>.tmp`` (``.<name>.<pid>.old`` for a folder being replaced), so that a later run can
tell from the name alone which target it belongs to and whether its writer still runs
(``parse_temp``, ``remove_stale_temps``). The cache's clean-up and ``atomic_directory`` both use it.

What is atomic, on POSIX:
- a file (``atomic_write``): written under its temporary name, fsynced, renamed over the target
  (``rename(2)`` replaces atomically), then the folder entry is fsynced. A crash at any moment
  leaves the old file or the new one, never a mix; a killed writer's temporary file is removed
  by the next writer of that folder.
- a folder (``atomic_directory``: an export, a converted backbone): built under its temporary
  name, every file in it fsynced, then put in place. A new target is one ``rename(2)``. An
  existing one is swapped in one step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``,
  on ext4, xfs, btrfs, tmpfs and most local file systems): the target is never missing. Where it
  cannot (other systems, some network file systems) it takes two renames, target -> ``.old`` then
  new -> target, and between them the target is absent for a moment; a crash there leaves the old
  folder under its ``.old`` name, which the next ``atomic_directory`` for that target puts back.
  Readers therefore always find the old folder or the new one, except in that fallback's moment.
- a pair of files written together (a heads folder: ``write_temp`` each, then a rename each): each
  rename is atomic but the pair is not; the writer of the pair says how a reader takes the last
  complete one (``pipeline.model.heads_io``).
Cache parts and manifests, heads, exports, scores, benchmark results and generated datasets all
go through here. A write that fails for a reason the user can fix (a full disk, an output path that
is a folder, no permission) is a ``WriteError`` naming the path the user gave, never the temporary name.

Who may write a folder at a time is ``pipeline.locks``'s job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from pipeline.errors import UserError

TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.(?P<kind>tmp|old)$")


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """The temporary name ``path`` is written under: hidden, in the same folder, tagged with our pid.

    >>> temp_path(Path("cache/part-00001.parquet")).name == f".part-00001.parquet.{os.getpid()}.tmp"
    True
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}")


def parse_temp(name: str) -> tuple[str, int, str] | None:
    """(target name, writer's pid, "tmp" | "old") of a name ``temp_path`` made, else None.

    >>> parse_temp(".heads.json.4242.tmp")
    ('heads.json', 4242, 'tmp')
    >>> parse_temp("heads.json") is None
    True
    """
    m = TEMP_NAME.match(name)
    return (m["target"], int(m["pid"]), m["kind"]) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs here (a pid reused by another process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path, is_target: Callable[[str], bool], include_own: bool = False) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` whose target name passes ``is_target`` and whose
    writer no longer runs (with ``include_own``, ours too: left by an earlier failure of this process)."""
    removed = []
    for f in folder.iterdir():
        parsed = parse_temp(f.name)
        if parsed is None or not is_target(parsed[0]):
            continue
        target, pid, _ = parsed
        if (include_own and pid == os.getpid()) or (pid != os.getpid() and not pid_alive(pid)):
            shutil.rmtree(f, ignore_errors=True) if f.is_dir() and not f.is_symlink() else f.unlink(missing_ok=True)
            removed.append(f)
    return removed


class WriteError(UserError):
    """A write that failed for a reason outside the program (a full disk, a folder where a file goes, no
    permission), naming the path the user gave and the cause."""


WRITE_CAUSES = {
    errno.ENOSPC: "no space left on the device: free some space, or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free some space, or write elsewhere",
    errno.EISDIR: "it is a folder: give the path of a file (in a folder that exists or can be made)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file stands where a folder of the path goes",
    errno.EACCES: "permission denied: choose a folder you can write",
    errno.EPERM: "permission denied: choose a folder you can write",
    errno.EROFS: "the file system is read-only: choose another folder",
}


def write_error(path: Path, e: BaseException, temp: Path | None = None) -> WriteError | None:
    """The ``WriteError`` that says why writing ``path`` (under the temporary name ``temp``) failed with ``e``,
    or None when ``e`` is not such a cause. A full disk is one whatever raised it (pyarrow and safetensors
    report it in their own words); the other causes only when the error names ``path`` or ``temp`` (a file
    that could not be read on the way is not the output's fault).

    >>> str(write_error(Path("out/x.jsonl"), OSError(errno.ENOSPC, "No space left on device", ".x.jsonl.1.tmp")))
    'cannot write out/x.jsonl: no space left on the device: free some space, or write elsewhere'
    """
    code = e.errno if isinstance(e, OSError) else None
    if code not in WRITE_CAUSES and "No space left on device" in str(e):
        code = errno.ENOSPC
    if code not in WRITE_CAUSES:
        return None
    named = {os.fspath(f) for f in (getattr(e, "filename", None), getattr(e, "filename2", None)) if f is not None}
    ours = {os.fspath(path)} | ({os.fspath(temp)} if temp is not None else set())
    if code not in (errno.ENOSPC, errno.EDQUOT) and not named & ours and not (
            temp is not None and any(Path(f).is_relative_to(temp) for f in named)):
        return None
    return WriteError(f"cannot write {path}: {WRITE_CAUSES[code]}")


@contextlib.contextmanager
def named_for(path: Path, temp: Path | None = None) -> Iterator[None]:
    """Turn a failure to write ``path`` (under ``temp``) that the user can fix into a ``WriteError`` naming ``path``."""
    try:
        yield
    except Exception as e:
        error = None if isinstance(e, UserError) else write_error(path, e, temp)
        if error is None:
            raise
        raise error from None


def write_temp(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for ``tmp = temp_path(path)`` and fsync it; returns ``tmp`` (``path`` is not touched).
    On any failure the temporary file is removed (a fixable cause raised as a ``WriteError`` naming ``path``)."""
    path = Path(path)
    with named_for(path, path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with named_for(path, tmp):
            write(tmp)
            _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: Path, path: str | os.PathLike) -> Path:
    """Rename ``tmp`` over ``path`` (atomic) and fsync the folder; ``tmp`` is removed if the rename fails."""
    path = Path(path)
    try:
        with named_for(path, tmp):
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)``, fsync ``tmp``, rename it over ``path``, fsync the folder; returns ``path``.

    On any failure (Ctrl-C included) the temporary file is removed and ``path`` is left as it was; a cause
    the user can fix (a full disk, ``path`` a folder) is a ``WriteError`` naming ``path``.
    """
    return commit(write_temp(path, write), path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value, indent: int | None = 2) -> Path:
    """``path`` holds ``value`` as strict JSON (NaN and infinities written as null), atomically."""
    return write_text(path, json_text(value, indent))


def json_text(value, indent: int | None = 2) -> str:
    """``value`` as strict JSON (NaN and infinities written as null), one line break at the end."""
    return json.dumps(finite(value), indent=indent, allow_nan=False) + "\n"


def finite(value):
    """``value`` with every NaN / infinite float replaced by None, in nested dicts and lists.

    >>> finite({"a": [1.0, float("nan")], "b": float("inf")})
    {'a': [1.0, None], 'b': None}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; on success it replaces ``out`` (see the module
    docstring for what is atomic where). On failure the temporary folder is removed and ``out`` is
    untouched. What an earlier, killed run left for ``out`` is cleaned up first (``recover_directory``)."""
    out = Path(out)
    require_folder_target(out)
    with named_for(out, out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(out)
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    with named_for(out, tmp):
        tmp.mkdir()
    try:
        with named_for(out, tmp), naming_out(out, tmp):
            yield tmp
            _fsync_tree(tmp)
            if out.exists() and exchange(tmp, out):  # out is the new folder now, tmp the old one
                _fsync(out.parent)
            elif out.exists():
                _replace_in_two_renames(tmp, out)
            else:
                os.replace(tmp, out)
                _fsync(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def naming_out(out: Path, tmp: Path) -> Iterator[None]:
    """A ``WriteError`` about a file in the temporary folder ``tmp`` names it as it will be, inside ``out``."""
    try:
        yield
    except WriteError as e:
        if os.fspath(tmp) not in str(e):
            raise
        raise WriteError(str(e).replace(os.fspath(tmp), os.fspath(out))) from None


def require_folder_target(out: str | os.PathLike) -> None:
    """Refuse an ``out`` where something other than a folder stands (a file, a link to one): ``atomic_directory``
    replaces its target as a whole, and a user's file is never what it may replace."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise WriteError(f"cannot write {out}: a file stands there, and the output is a folder (replaced as a "
                         "whole): give the path of a folder, or move the file away")


def recover_directory(out: Path) -> None:
    """After a killed ``atomic_directory`` for ``out``: put the old folder back when the kill came between
    the fallback's two renames (``out`` missing, its ``.old`` there), and remove every other leftover
    of a writer that no longer runs."""
    if not out.parent.is_dir():
        return
    if not out.exists():
        olds = [f for f in out.parent.iterdir() if (p := parse_temp(f.name)) and p[0] == out.name and p[2] == "old"
                and not pid_alive(p[1])]
        if olds:
            os.replace(max(olds, key=lambda f: f.stat().st_mtime), out)
    remove_stale_temps(out.parent, lambda target: target == out.name)


def exchange(a: Path, b: Path) -> bool:
    """Swap the two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or the
    file system cannot, leaving both as they were."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc without it (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_in_two_renames(new: Path, out: Path) -> None:
    """out -> its ``.old`` name, then new -> out (the target is absent in between); the old folder is
    put back if the second rename fails, and removed once the new one is in place."""
    old = temp_path(out, "old")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    _fsync(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder in it, so that what is renamed into place is on disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                _fsync(path)
        _fsync(Path(root))


def fsync_folder(folder: str | os.PathLike) -> None:
    """fsync ``folder``'s entries (after a rename in it)."""
    _fsync(Path(folder))


def _fsync(path: Path) -> None:
    """fsync one file or folder (a folder's entry list: so that a rename into it is on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
