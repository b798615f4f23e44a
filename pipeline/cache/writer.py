"""Writing a cache: ``open_writer`` creates or resumes one (one writer at a time, under the folder's lock),
checks it against the run's settings, cleans what a killed run left, and writes parts atomically until
``finish`` marks it complete.

Crash safety: a part is written under a temporary name in the same folder, fsynced, then renamed
(``pipeline.atomic``), so no reader ever sees half a part; the manifest is rewritten the same way after
every part. A writer that opens an existing cache removes stale temporary files, drops part files
the manifest does not list (killed between rename and manifest update) and listed parts whose
size changed, and skips the rest (`part_done`). `finish()` marks the cache complete; readers
refuse an incomplete cache.

Many writers (torchrun ranks, ``pipeline.features.distributed``): rank 0 opens the cache with `open_writer`
(the lock, the checks and clean-up above) while the others wait; then each rank writes its own parts
through a ``pipeline.cache.journals.RankWriter``; once every rank is done, rank 0 folds their journals
into the manifest (`merge_journals`) and finishes.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from pipeline.atomic import FolderBusy, atomic_write
from pipeline.atomic import lock_folder as lock
from pipeline.cache.journals import journal_parts, remove_files
from pipeline.cache.layout import MANIFEST, CacheError, CacheIncomplete, CacheSpec, json_normal, now, part_name
from pipeline.cache.manifest import check_compatible, content_fingerprint, new_manifest, part_problem, read_manifest
from pipeline.cache.parts import remove_cache_files, remove_stale_temps, remove_unlisted_parts, write_part_file


def open_writer(path, spec: CacheSpec, *, overwrite: bool = False, n_parts: int | None = None,
                verify: bool = True) -> CacheWriter:
    """Open (create or resume) the cache at `path` for writing `spec`'s features.

    An existing cache made with other settings raises CacheMismatch naming each differing field,
    unless `overwrite` (then its parts and manifest are removed first). `n_parts`, when known,
    is recorded (so a half-written cache can say "N of M parts") and must match on resume.
    `verify` checks every done part's checksum (otherwise only its size): a damaged part is dropped
    and so written again.
    """
    return CacheWriter(Path(path), spec, overwrite=overwrite, n_parts=n_parts, verify=verify)


class CacheWriter:
    """Writes the parts of one cache atomically; `done_parts` are those a resumed run can skip.

    One writer at a time: it holds an exclusive lock on the cache folder (``fcntl.flock`` on the folder
    itself, so no lock file is left behind; the kernel releases it if the process dies) from opening
    until ``finish`` or ``close``, and a second writer is refused at once. Under torchrun, rank 0's writer
    holds it for the whole run while every rank writes its parts through a ``journals.RankWriter``.
    """

    def __init__(self, folder: Path, spec: CacheSpec, *, overwrite: bool, n_parts: int | None, verify: bool):
        self.folder, self.spec, self._lock = folder, spec, None
        self.parts_written = 0  # by this writer
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = lock_folder(folder)
        try:
            self._open(overwrite, n_parts, verify)
        except BaseException:
            self.close()
            raise

    def _open(self, overwrite: bool, n_parts: int | None, verify: bool) -> None:
        folder, spec = self.folder, self.spec
        remove_stale_temps(folder)
        if overwrite:
            remove_cache_files(folder)
        old = read_manifest(folder) if (folder / MANIFEST).exists() else None
        if old is not None:
            check_compatible(folder, old, spec, n_parts)
        self.manifest = old or new_manifest(spec)
        if n_parts is not None:
            self.manifest["n_parts"] = int(n_parts)
        self._parts = {int(p["index"]): p for p in self.manifest["parts"]}
        journals = self._fold_journals()  # parts written by the ranks of a killed torchrun run
        lost = self._drop_bad_parts(verify)  # listed parts that are gone or changed: not complete now
        if lost:
            self.manifest.update(complete=False, completed=None)
        stray = remove_unlisted_parts(folder, self._parts)  # e.g. killed between rename and manifest
        if old is None or lost or stray or journals or n_parts is not None:
            self._save()
        remove_files(journals)  # their parts are in the manifest now

    def close(self) -> None:
        """Release the folder's lock (``finish`` does too); the writer writes nothing more."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    @property
    def done_parts(self) -> set[int]:
        return set(self._parts)

    def part_done(self, index: int) -> bool:
        return int(index) in self._parts

    def write_part(self, index: int, columns: dict, dropped: int = 0) -> dict:
        """Write part `index` atomically (replacing it if done) and record it in the manifest.

        `columns`: id, source, n_tokens, embedding [n, d] (np.ndarray or torch tensor; cast to the
        storage dtype after a range check), optional subset, pair_id, role (arrays, or one string
        for the whole part), labels [n, 5] float32 (NaN = missing; default all NaN), base_score and
        margin [n] (NaN or None = null). `dropped`: rows of this part's input left out (too long).
        """
        entry = write_part_file(self.folder, self.spec, self.manifest, index, columns, dropped)
        self._parts[entry["index"]] = entry
        self.manifest.update(complete=False, fingerprint=None, completed=None)
        self._save()
        self.parts_written += 1
        return dict(entry)

    def finish(self, n_parts: int, extra: dict | None = None) -> dict:
        """Mark the cache complete once parts 0..n_parts-1 are all written; returns the manifest.

        `extra`: run information recorded under manifest["info"] (not compared on resume).
        """
        missing = [i for i in range(n_parts) if i not in self._parts]
        if missing:
            raise CacheIncomplete(f"{self.folder}: cannot finish: {len(missing)} of {n_parts} parts not written "
                                  f"(first missing: {part_name(missing[0])})")
        for i in [i for i in self._parts if i >= n_parts]:  # left by an earlier run with more parts
            (self.folder / self._parts.pop(i)["file"]).unlink(missing_ok=True)
        m = self.manifest
        m.update(n_parts=int(n_parts), complete=True, completed=now(), info=json_normal(extra or {}))
        self._save()
        self.close()
        return copy.deepcopy(self.manifest)

    def merge_journals(self) -> None:
        """Fold the ranks' journals into the manifest (torchrun, rank 0, after every rank is done).

        Each listed part's size is checked (its checksum was computed by the rank that wrote it).
        """
        journals = self._fold_journals()
        lost = self._drop_bad_parts(verify=False)
        if lost:
            self.manifest.update(complete=False, completed=None)
        self._save()
        remove_files(journals)

    def _fold_journals(self) -> list[Path]:
        """Add the parts listed in the folder's rank journals (``journal_parts``); returns the journal files read."""
        found, files = journal_parts(self.folder, self.manifest, set(self._parts))
        self._parts.update(found)
        return files

    def _drop_bad_parts(self, verify: bool) -> bool:
        """Drop (and delete) listed parts that are missing or changed; whether there were any."""
        bad = {i: why for i, p in self._parts.items() if (why := part_problem(self.folder, p, verify))}
        for i in bad:
            (self.folder / self._parts.pop(i)["file"]).unlink(missing_ok=True)
        return bool(bad)

    def _save(self) -> None:
        m = self.manifest
        m["parts"] = [self._parts[i] for i in sorted(self._parts)]
        m["rows"] = sum(p["rows"] for p in m["parts"])
        m["dropped_rows"] = sum(p["dropped"] for p in m["parts"])
        m["updated"] = now()
        m["fingerprint"] = content_fingerprint(m) if m["complete"] else None
        data = (json.dumps(m, indent=1) + "\n").encode()
        atomic_write(self.folder / MANIFEST, lambda tmp: tmp.write_bytes(data))


def remove_unbegun(path: Path) -> None:
    """Remove the cache folder this run created when it stops before writing any part (the backbone or engine
    would not load, Ctrl-C while loading): nothing is left behind, where there was nothing before."""
    import shutil

    try:
        empty = not (path / MANIFEST).exists() or not read_manifest(path)["parts"]
    except Exception:  # an unreadable manifest is not this run's to remove
        return
    if empty and not any(path.glob("part-*.parquet")):
        shutil.rmtree(path, ignore_errors=True)


def lock_folder(folder: Path) -> int:
    """An open descriptor of ``folder`` holding its exclusive lock; CacheError naming the holder when another
    writer has it."""
    try:
        return lock(folder)
    except FolderBusy as e:
        holder = f" (process {e.pid})" if e.pid else ""
        raise CacheError(f"{folder}: another `urm extract` is writing this cache now{holder}; wait for it to finish "
                         "(or stop it), then run this one again: it resumes from the parts that one wrote") from None
