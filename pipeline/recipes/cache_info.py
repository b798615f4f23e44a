"""`urm cache info`: a person's summary of a feature cache: what made it, its size, rows per group."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import (MANIFEST, REBUILD, CacheError, arrow_schema, part_problem, parts_layout_problems,
                            read_manifest, rows_problem)


def cache_info(path, verify: bool = True) -> str:
    """A human summary of a cache (complete or not): what made it, its size, rows per group; every part's
    checksum is verified first (``verify``), and missing or changed parts are named, as is a part whose columns,
    hidden size, dtype or rows disagree with the manifest (what the readers refuse). A damaged or incomplete
    cache raises ``UnusableCache`` carrying the summary (the CLI prints it, then fails: exit 0 means usable)."""
    folder = Path(path)
    m = read_manifest(folder)
    problems = {p["file"]: why for p in m["parts"] if (why := part_problem(folder, p, verify))}
    if why := rows_problem(m):
        problems[MANIFEST] = why
    disagree = {} if problems else layout_problems(folder, m)
    parts = [p for p in m["parts"] if p["file"] not in problems and p["file"] not in disagree]
    size = sum(p["bytes"] for p in m["parts"]) + (folder / MANIFEST).stat().st_size
    if problems:
        first = next(iter(problems.items()))
        state = (f"DAMAGED: {len(problems)} of {len(m['parts'])} parts missing or changed ({first[0]} {first[1]}); "
                 "run the same `urm extract` again to rebuild them")
    elif disagree:
        first = next(iter(disagree.items()))
        state = (f"MANIFEST AND PARTS DISAGREE: {first[0]} {first[1]}"
                 + (f" (and {len(disagree) - 1} more)" if len(disagree) > 1 else "") + f"; {REBUILD}")
        problems = disagree
    elif not m.get("complete"):
        state = "INCOMPLETE: run `urm extract` again to finish it"
    else:
        state = "complete" + (", every part's checksum verified" if verify else " (checksums not verified)")
    lines = [
        f"{folder}  ({state})",
        f"  backbone       {m['backbone']} @ {m.get('backbone_revision') or 'unknown revision'}",
        f"  hidden size    {m['hidden_size']}, stored as {m['storage_dtype']}",
        f"  max_length     {m['max_length']}",
        f"  chat template  {m.get('chat_template_hash')}",
        f"  dataset        {m.get('dataset')} (fingerprint {m.get('dataset_fingerprint')})",
        f"  kind           {m['kind']}; labels {', '.join(m['label_names'])}",
        f"  rows           {m['rows']} ({m.get('dropped_rows', '?')} dropped: longer than max_length)",
        f"  parts          {len(parts)} of {m.get('n_parts') or '?'} complete and intact, {_human_bytes(size)} on disk",
        f"  created        {m.get('created')}" + (f", completed {m['completed']}" if m.get("completed") else ""),
        f"  fingerprint    {m.get('fingerprint') or '(none until complete)'}",
        f"  written by     urm-pipeline {m.get('package_version')}, cache format {m.get('format_version')}",
        f"  engine         {engine_of(m)}",
    ]
    if m.get("extra"):
        lines.append(f"  extra          {json.dumps(m['extra'], sort_keys=True)}")
    counts = _group_counts(folder, parts)
    if problems:
        counts = [line.replace("rows by source", "rows of the intact parts by source") for line in counts]
    if problems or not m.get("complete"):
        why = state if problems else (f"cache is incomplete ({len(m['parts'])} of {m.get('n_parts') or '?'} parts "
                                      "written, not marked complete); run `urm extract` again to finish it")
        raise UnusableCache("\n".join(lines + counts), f"{folder}: {why}")
    return "\n".join(lines + counts)


class UnusableCache(CacheError):
    """A cache no command would read (damaged: parts missing or changed; or incomplete): ``summary`` is what
    `urm cache info` prints before failing."""

    def __init__(self, summary: str, message: str):
        super().__init__(message)
        self.summary = summary


def engine_of(m: dict) -> str:
    """The extraction engine of a cache and its version: vllm's from its identity (``extra``), hf's from the finished
    manifest's ``info``; a cache made before engines were recorded is an hf one."""
    extra, info = m.get("extra") or {}, m.get("info") or {}
    engine = extra.get("engine") or info.get("engine") or "hf"
    version = extra.get("engine_version") or info.get("engine_version")
    if engine == "vllm" and version:
        version = f"vllm {version}"
    return f"{engine} ({version})" if version else engine


def layout_problems(folder: Path, m: dict) -> dict[str, str]:
    """File -> what in it disagrees with the manifest (a part's columns, hidden size, dtype or rows, as the readers
    check them; the manifest's own ``columns`` against its hidden size and dtype); empty when nothing does."""
    found = parts_layout_problems(folder, m)
    expected = {f.name: str(f.type) for f in arrow_schema(m["hidden_size"], m["storage_dtype"], len(m["label_names"]))}
    columns = m.get("columns")
    wrong = [k for k, v in columns.items() if k in expected and v != expected[k]] if isinstance(columns, dict) else []
    if wrong and not found:  # the parts agree with the manifest's settings, its own list of columns does not
        found[MANIFEST] = (f"lists column {wrong[0]!r} as {columns[wrong[0]]}, but its hidden size {m['hidden_size']}, "
                           f"dtype {m['storage_dtype']} and {len(m['label_names'])} labels make it {expected[wrong[0]]}")
    return found


def _group_counts(folder: Path, parts: list) -> list[str]:
    keys = ["source", "subset", "role"]
    try:
        tables = [pq.read_table(folder / p["file"], columns=keys) for p in parts if (folder / p["file"]).exists()]
    except (pa.ArrowException, OSError) as e:  # read unverified (--no-verify) and damaged
        return [f"  rows by source / subset / role: not readable ({e}); run `urm cache info` with --verify"]
    if not tables:
        return []
    counts = pa.concat_tables(tables).group_by(keys).aggregate([([], "count_all")]).sort_by([(k, "ascending") for k in keys])
    rows = [["-" if r[k] is None else str(r[k]) for k in keys + ["count_all"]] for r in counts.to_pylist()]
    header = ["source", "subset", "role", "rows"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "    " + "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + f"  {{:>{widths[-1]}}}"
    return ["  rows by source / subset / role:", fmt.format(*header)] + [fmt.format(*r) for r in rows]


def _human_bytes(n: float) -> str:
    unit = next((u for u in ("B", "KB", "MB", "GB") if n < 1024 ** (("B", "KB", "MB", "GB").index(u) + 1)), "TB")
    return f"{n / 1024 ** ('B', 'KB', 'MB', 'GB', 'TB').index(unit):.1f} {unit}"
