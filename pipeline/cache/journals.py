"""torchrun ranks writing one cache: each rank's ``RankWriter`` lists the parts it wrote in the rank's
journal (``_parts.rank-NNNNN.json``, rewritten atomically after each part) instead of the manifest,
and rank 0's writer folds the journals in (``journal_parts``) once every rank is done, or when it
opens a cache a killed run left (then the parts they list count as done, with any number of ranks).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from pipeline.atomic import atomic_write
from pipeline.cache.layout import JOURNAL_RE, CacheSpec, journal_name, now, part_name
from pipeline.cache.manifest import part_entry_problem, settings_key, whole
from pipeline.cache.parts import write_part_file


def open_rank_writer(path, spec: CacheSpec, manifest: dict, rank: int) -> RankWriter:
    """The writer of torchrun rank ``rank``'s parts, once rank 0 has opened the cache (``manifest`` is rank 0's
    ``writer.manifest``): no lock, no clean-up, no manifest writes; rank 0 merges its journal."""
    return RankWriter(Path(path), spec, manifest, rank)


class RankWriter:
    """Writes one torchrun rank's parts atomically and lists each in the rank's journal.

    The ranks of one run write disjoint parts, so they never write the same file; each journal is
    rewritten atomically after each part, so it lists exactly the parts that are complete.
    """

    def __init__(self, folder: Path, spec: CacheSpec, manifest: dict, rank: int):
        self.folder, self.spec, self.manifest, self.rank = folder, spec, manifest, int(rank)
        self.parts: dict[int, dict] = {}
        self.parts_written = 0

    def write_part(self, index: int, columns: dict, dropped: int = 0) -> dict:
        """As ``CacheWriter.write_part``, recorded in this rank's journal instead of the manifest."""
        entry = write_part_file(self.folder, self.spec, self.manifest, index, columns, dropped)
        self.parts[entry["index"]] = entry
        journal = {"format": "urm-feature-cache-journal", "rank": self.rank, "host": socket.gethostname(),
                   "pid": os.getpid(), "settings": settings_key(self.manifest), "updated": now(),
                   "parts": [self.parts[i] for i in sorted(self.parts)]}
        data = (json.dumps(journal, indent=1) + "\n").encode()
        atomic_write(self.folder / journal_name(self.rank), lambda tmp: tmp.write_bytes(data))
        self.parts_written += 1
        return dict(entry)


def journal_parts(folder: Path, manifest: dict, known: set[int]) -> tuple[dict[int, dict], list[Path]]:
    """The parts the rank journals in ``folder`` list and ``known`` (the manifest's) does not, by index, and the
    journal files read.

    A journal is ignored when unreadable or made for other settings, and so is an entry that is
    malformed, outside n_parts or already listed; the parts it names are then written again (an
    unlisted part file is removed by the writer).
    """
    key, n_parts = settings_key(manifest), manifest.get("n_parts")
    files = sorted(f for f in folder.iterdir() if JOURNAL_RE.match(f.name))
    found: dict[int, dict] = {}
    for f in files:
        journal = read_journal(f)
        if journal is None or journal.get("settings") != key:
            continue
        for entry in journal["parts"]:
            index = entry.get("index")
            if (whole(index) and index not in known and index not in found and (n_parts is None or index < n_parts)
                    and entry.get("file") == part_name(index) and part_entry_problem(entry) is None
                    and isinstance(entry.get("sha256"), str)):
                found[index] = entry
    return found, files


def read_journal(file: Path) -> dict | None:
    """A journal's content, or None when it cannot be read or does not hold a list of part entries."""
    try:
        journal = json.loads(file.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(journal, dict) and isinstance(journal.get("parts"), list)
    return journal if ok and all(isinstance(p, dict) for p in journal["parts"]) else None


def remove_files(files: list[Path]) -> None:
    """Remove these files (journals whose parts the manifest now lists); a missing one is fine."""
    for f in files:
        f.unlink(missing_ok=True)
