"""Where a command may write: the one rule every output path passes (``check_output``), before anything loads.

Every command that writes names its output here: `urm score -o FILE`, `urm curate --out-dir DIR`, `urm evaluate
--report-dir DIR`, `urm export --out-dir DIR` (folders written whole, ``pipeline.atomic.atomic_directory``), and
the folders `urm extract` (``--cache-dir``: one folder per dataset) and the trainings (``--heads-dir``) add their
own files to. The rule, in the order it is checked:

1. Never an input of the same run: the output is not an input, is not inside an input folder, and (a folder) holds
   no input. ``--overwrite`` does not change this.
2. Never an odd target: not empty, not a device, a pipe or a socket (``-o /dev/null``), not on a system file
   system (``/proc``, ``/sys``, ``/dev``), and a place this process can create files in (checked by creating one and
   removing it). A folder written whole is never ``.`` (the folder the command runs in), nor one above it.
3. Never deletes or overwrites what the run did not create, unless ``--overwrite``: a file or folder already there
   is replaced only when it is empty or the same command's own earlier output (``own``: a scores file, a report
   folder, a curation folder; an export never: `urm export` always asks). A folder the command adds its own files
   to (``PARTS``) keeps every other file anyway, so only rules 1 and 2 apply to it.

Each refusal is one ``OutputRefused`` (a ``WriteError``) naming the option and the path as the user typed them.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable, Iterable

from pipeline.atomic import WRITE_CAUSES, WriteError, parse_temp, temp_path

FILE, FOLDER, PARTS = "file", "folder", "parts"  # an output file; a folder written whole; a folder of parts
SYSTEM_FILE_SYSTEMS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "securityfs",
                       "tracefs", "configfs", "bpf", "pstore", "fusectl", "efivarfs", "mqueue", "binfmt_misc"}


class OutputRefused(WriteError):
    """An output path the rule refuses (``check_output``): the message names the option, the path and the fix."""


def check_output(path: str | os.PathLike, option: str, shape: str, *,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), overwrite: bool = False,
                 own: Callable[[Path], bool] | None = None) -> Path:
    """``path`` (given with ``option``) checked as an output of ``shape`` (``FILE``, ``FOLDER`` or ``PARTS``) against
    the run's ``inputs`` ((option, path) pairs; None entries skipped) by the rule of the module docstring; returns it
    as a Path. ``own(path)`` says whether what stands at ``path`` is this command's own earlier output."""
    typed = os.fspath(path)
    where = f"{option} {typed}"
    if not typed.strip():
        raise OutputRefused(f"{option} is empty: give the path to write")
    out = Path(typed)
    resolved = out.resolve()
    for name, given in inputs:
        if given is None or not os.fspath(given):
            continue
        held = Path(given).resolve()
        if held == resolved:
            why = f"it is {name} {os.fspath(given)}"
        elif resolved in held.parents and shape == FOLDER:
            why = f"it holds {name} {os.fspath(given)}"
        elif held in resolved.parents and held.is_dir():
            why = f"it is inside {name} {os.fspath(given)}"
        else:
            continue
        raise OutputRefused(f"{where}: {why}, an input of this run, which an output never replaces (not even with "
                            f"--overwrite); choose another {option}")
    odd = odd_target(out, resolved, shape)
    if odd:
        raise OutputRefused(f"{where}: {odd}")
    if shape == PARTS or not os.path.lexists(out):
        return out
    if shape == FILE and out.is_dir():
        raise OutputRefused(f"{where}: {WRITE_CAUSES[errno.EISDIR]}, e.g. {option} {out / 'scores.jsonl'}")
    if shape == FOLDER and not out.is_dir():
        raise OutputRefused(f"{where}: a file stands there, and the output is a folder (replaced as a whole): give "
                            "the path of a folder, or move the file away")
    if overwrite or is_empty(out) or (own is not None and own(out)):
        return out
    if own is None:
        raise OutputRefused(f"{where} already exists; pass --overwrite to replace it, or choose another {option}")
    if shape == FILE:
        raise OutputRefused(f"{where}: a file is there that is not this command's earlier output; pass --overwrite "
                            f"to replace it, or choose another {option}")
    names = sorted(n for n in entry_names(out) if not (isinstance(own, OwnFiles) and own.is_own(out / n)))
    raise OutputRefused(f"{where}: the folder holds {len(names)} entr{'y' if len(names) == 1 else 'ies'} this command "
                        f"did not write (e.g. {names[0]}), and it would be replaced as a whole; pass --overwrite to "
                        f"replace it, or choose another {option}")


def odd_target(out: Path, resolved: Path, shape: str) -> str | None:
    """Why ``out`` is no place for an output (a device, a system file system, the folder we run in, a place that
    cannot be written), in words; None when it is one."""
    try:
        mode = os.stat(out).st_mode
    except OSError:
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return ("a device, pipe or socket stands there, not a file or folder: give the path of a file or folder "
                "(a command that writes to stdout without -o can be redirected instead)")
    system = file_system(resolved)
    if system in SYSTEM_FILE_SYSTEMS:
        return f"it is on the system's {system} file system, not a place for output: give a path of your own"
    if shape == FOLDER and (resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents):
        return ("that is the folder this command runs in (or one above it), and the output is a folder replaced as a "
                "whole: give a new folder, e.g. a name inside it")
    return cannot_create(out if shape == PARTS else out.parent)  # a file or a whole folder is renamed into the parent


def cannot_create(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` or the nearest folder above it that exists (the rest would be made),
    in words; None when one can (tried: a file made under ``pipeline.atomic``'s temporary name and removed)."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return WRITE_CAUSES[errno.EEXIST]
    probe = temp_path(existing / "urm-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as e:
        return f"no file can be created in {existing}: {WRITE_CAUSES.get(e.errno, e.strerror)}"
    os.unlink(probe)
    return None


def file_system(path: Path) -> str | None:
    """The type of the file system ``path`` lies on (``/proc/self/mounts``; None where that cannot be read)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = -1, None
    for fields in map(str.split, lines):
        if len(fields) < 3:
            continue
        mount = Path(fields[1].replace("\\040", " "))
        if (mount == path or mount in path.parents) and len(mount.parts) > best:
            best, kind = len(mount.parts), fields[2]
    return kind


def entry_names(folder: Path) -> list[str]:
    """The entries of ``folder`` but the temporary files of writers (``pipeline.atomic``'s naming rule)."""
    return [e.name for e in folder.iterdir() if parse_temp(e.name) is None]


def is_empty(path: Path) -> bool:
    """An empty file, or a folder with no entries but writers' temporary files."""
    return not entry_names(path) if path.is_dir() else path.stat().st_size == 0


class OwnFiles:
    """An ``own`` test for a folder written whole: every entry is a file whose name passes ``names`` (the files the
    command writes there)."""

    def __init__(self, names: Callable[[str], bool]):
        self.names = names

    def is_own(self, entry: Path) -> bool:
        return self.names(entry.name) and entry.is_file() and not entry.is_symlink()

    def __call__(self, folder: Path) -> bool:
        return folder.is_dir() and all(self.is_own(folder / n) for n in entry_names(folder))
