"""One part file of a cache: written atomically with its manifest entry (rows, size, checksums), and the
folder's clean-up when a writer opens it (stale temporary files, parts the manifest does not list).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write
from pipeline.atomic import remove_stale_temps as remove_stale_temp_files
from pipeline.cache.columns import build_table
from pipeline.cache.layout import (FIX, PART_KEY, PART_RE, CacheInputError, CacheMismatch, CacheSpec, is_cache_file,
                                   parquet_options, part_name, row_group_rows)
from pipeline.hashing import file_sha256, file_xxh3


def write_part_file(folder: Path, spec: CacheSpec, manifest: dict, index: int, columns: dict, dropped: int) -> dict:
    """Write part ``index`` atomically; its manifest entry (file, size, checksums, rows, dropped)."""
    index, total = int(index), manifest.get("n_parts")
    if index < 0 or (total is not None and index >= total):
        raise CacheInputError(f"{folder}: part index {index} is outside 0..{(total or 1) - 1} (n_parts {total})")
    name = part_name(index)
    table = build_table(spec, columns, folder / name)
    written = {f.name: str(f.type) for f in table.schema}
    if manifest["columns"] != written:  # parts of one cache share one schema
        missing = sorted(set(written) - set(manifest["columns"]))
        raise CacheMismatch(f"{folder} was written by an older version of this package (without the "
                            f"column(s) {missing}); {FIX}.")
    table = table.replace_schema_metadata({PART_KEY: str(index).encode()})  # which part it is, in its footer
    entry = write_parquet_atomic(folder, name, table, row_group_rows(spec))
    return {"index": index, **entry, "rows": table.num_rows, "dropped": int(dropped)}


def write_parquet_atomic(folder: Path, name: str, table: pa.Table, group_rows: int) -> dict:
    """``table`` as the Parquet file ``folder/name``, atomically; its size and both checksums."""
    def write(tmp: Path) -> None:
        with pq.ParquetWriter(str(tmp), table.schema, **parquet_options()) as w:
            w.write_table(table, row_group_size=group_rows)

    path = atomic_write(folder / name, write)
    return {"file": name, "bytes": path.stat().st_size, "sha256": file_sha256(path), "xxh3_128": file_xxh3(path)}


def remove_stale_temps(folder: Path) -> None:
    """Remove the temporary files of the cache's own files (``pipeline.atomic``'s naming rule) left by a writer
    that no longer runs, or by an earlier failure of this process."""
    remove_stale_temp_files(folder, is_cache_file, include_own=True)


def remove_cache_files(folder: Path) -> None:
    """Remove every part, journal and the manifest (``--overwrite``); other files in the folder stay."""
    for f in folder.iterdir():
        if is_cache_file(f.name):
            f.unlink()


def remove_unlisted_parts(folder: Path, parts: dict) -> bool:
    """Remove part files the manifest does not list (a writer killed between a part's rename and the manifest's
    update); whether there were any."""
    listed = {p["file"] for p in parts.values()}
    stray = [f for f in folder.iterdir() if PART_RE.match(f.name) and f.name not in listed]
    for f in stray:
        f.unlink()
    return bool(stray)
