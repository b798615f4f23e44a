"""One writer per folder: an exclusive ``flock`` on the folder itself (``lock_folder``, ``hold_folder``), so no
lock file is left behind and the kernel releases it when the process ends, however it ends; a second writer is
refused at once, told the holder's pid (read from ``/proc/locks`` where there is one). A reader that must see the
folder unchanged while it copies (an export of a heads folder) takes the shared lock instead: readers together,
never beside a writer. Cache folders (``pipeline.cache.writer``) and heads folders (``pipeline.model.heads_io``)
are held this way.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


class FolderBusy(Exception):
    """``folder`` is locked by another process (``pid``: its id, None when the system does not say; ``shared``: it
    holds the shared lock, a reader's, rather than a writer's)."""

    def __init__(self, folder: Path, pid: int | None, shared: bool = False):
        self.folder, self.pid, self.shared = folder, pid, shared
        super().__init__(f"{folder} is locked by {'process ' + str(pid) if pid else 'another process'}")


def lock_folder(folder: str | os.PathLike, shared: bool = False) -> int:
    """An open descriptor of ``folder`` holding its exclusive lock (``flock``; ``shared``: the shared one; released
    with the descriptor, or by the kernel when the process ends); ``FolderBusy`` with the holder's pid when another
    process holds a lock that excludes it."""
    import fcntl

    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid, holder_shared = lock_holder(folder, exclude=os.getpid())
        raise FolderBusy(folder, pid, holder_shared) from None
    return fd


def lock_holder(folder: Path, exclude: int | None = None) -> tuple[int | None, bool]:
    """(the pid of a process holding ``folder``'s ``flock``, whether its lock is the shared one), from
    ``/proc/locks``; (None, False) where it cannot tell. ``exclude``: a pid not to name (our own shared lock).

    A line there reads ``1: FLOCK  ADVISORY  WRITE 4242 fe:00:5941016 0 EOF`` (READ for a shared lock; pid,
    then device:inode); a waiting lock's line has ``->`` and is skipped. A writer is named before readers."""
    try:
        st = os.stat(folder)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None, False
    device = (os.major(st.st_dev), os.minor(st.st_dev))
    by_device: dict[tuple[int, int], list[tuple[int, bool]]] = {}
    for fields in map(str.split, lines):
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[3] not in ("WRITE", "READ"):
            continue
        major, minor, inode = fields[5].split(":")
        if int(inode) == st.st_ino and int(fields[4]) != exclude:
            by_device.setdefault((int(major, 16), int(minor, 16)), []).append((int(fields[4]), fields[3] == "READ"))
    found = by_device.get(device) or (next(iter(by_device.values())) if len(by_device) == 1 else None)
    if not found:  # an overlay reports another device: taken when there is only one
        return None, False
    return min(found, key=lambda holder: holder[1])  # a writer (shared False) first


_HELD: dict[tuple[int, int], list[int]] = {}  # (device, inode) -> [descriptor, depth] of the folders this process holds


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock for the block (``lock_folder``; ``shared``: the readers' lock); re-entrant within this
    process, so a recipe that holds it can call one that takes it again (a lock held is kept as it is)."""
    st = os.stat(folder)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        _HELD[key] = [lock_folder(folder, shared), 1]
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            os.close(_HELD.pop(key)[0])
