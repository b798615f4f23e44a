"""A cache's manifest (``_manifest.json``): made new for a ``CacheSpec``, read and checked key by key,
compared with a run's settings (a cache made otherwise is refused, field by field), and the content
fingerprint downstream artifacts record. Also what is wrong with a listed part on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import __version__
from pipeline.cache.layout import (COMPAT_FIELDS, FIX, FORMAT_VERSION, KINDS, MANIFEST, PART_RE, REBUILD,
                                   STORAGE_DTYPES, CacheError, CacheMismatch, CacheSpec, arrow_schema, now)
from pipeline.hashing import file_sha256, file_xxh3, json_sha256


def new_manifest(spec: CacheSpec) -> dict:
    """The manifest of an empty cache for ``spec``: no parts yet, not complete."""
    return {
        "format": "urm-feature-cache", "format_version": FORMAT_VERSION, "package_version": __version__,
        "kind": spec.kind, "backbone": spec.backbone, "backbone_revision": spec.backbone_revision,
        "hidden_size": spec.hidden_size, "storage_dtype": spec.storage_dtype, "max_length": spec.max_length,
        "chat_template_hash": spec.chat_template_hash, "dataset": spec.dataset,
        "dataset_fingerprint": spec.dataset_fingerprint, "label_names": spec.label_names, "extra": spec.extra,
        "columns": {f.name: str(f.type) for f in arrow_schema(spec.hidden_size, spec.storage_dtype, len(spec.label_names))},
        "created": now(), "updated": None, "completed": None, "complete": False, "n_parts": None,
        "rows": 0, "dropped_rows": 0, "parts": [], "fingerprint": None, "info": {},
    }


def check_compatible(folder: Path, old: dict, spec: CacheSpec, n_parts: int | None) -> None:
    """CacheMismatch naming every field (``COMPAT_FIELDS``, ``extra.*``, the part count) in which the cache's
    manifest ``old`` differs from this run's ``spec``."""
    new = new_manifest(spec)
    diffs = []
    for key in COMPAT_FIELDS:
        if key == "extra":
            a, b = old.get("extra") or {}, new["extra"]
            diffs += [(f"extra.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif old.get(key) != new[key]:
            diffs.append((key, old.get(key), new[key]))
    if n_parts is not None and old.get("n_parts") not in (None, n_parts):
        diffs.append(("n_parts", old["n_parts"], n_parts))
    if diffs:
        lines = "\n".join(f"  {k}: cache has {a!r}, this run has {b!r}" for k, a, b in diffs)
        raise CacheMismatch(f"{folder} holds features made with other settings:\n{lines}\n{FIX}.")


def content_fingerprint(m: dict) -> str:
    """The cache's content fingerprint: what made the features and every part's sha256 (recorded by heads)."""
    content = {k: m.get(k) for k in COMPAT_FIELDS}
    content["parts"] = [p["sha256"] for p in m["parts"]]
    return json_sha256(content)


def settings_key(manifest: dict) -> str:
    """What a journal must have been written for: the manifest's settings and part count."""
    content = {k: manifest.get(k) for k in COMPAT_FIELDS}
    content.update(n_parts=manifest.get("n_parts"), columns=manifest.get("columns"))
    return json_sha256(content)


def read_manifest(path) -> dict:
    """The manifest of the cache folder ``path`` (CacheError when there is none or it is unreadable)."""
    folder = Path(path)
    file = folder / MANIFEST
    if not file.exists():
        raise CacheError(f"{folder}: no {MANIFEST}, so this is not a feature cache; run `urm extract` to build it")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8-sig"))  # a BOM is not data
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{file}: unreadable manifest ({e}); {REBUILD}") from None
    problem = manifest_problem(manifest)
    if problem:
        raise CacheError(f"{file}: not a cache manifest this version reads ({problem}); {REBUILD}")
    return manifest


def require_kind(path, kind: str, option: str, typed: str | None = None) -> dict:
    """The manifest of the cache folder ``path``, which must be there and hold ``kind`` rows ("ratings" or
    "preferences"); else CacheError naming ``option``, the command's option that named it, and the cache as the user
    typed it (``typed``, when that is not ``path``: a name looked up under --cache-dir, or --cache-dir itself)."""
    shown = f"{option} {path if typed is None else typed}"
    if not Path(path).exists():
        where = "" if typed is None or str(typed) == str(path) else f" ({path})"
        raise CacheError(f"{shown}: no such cache{where}; extract it with `urm extract`, or give the path of one")
    try:
        m = read_manifest(path)
    except CacheError as e:
        raise CacheError(f"{shown}: {str(e).removeprefix(f'{Path(path)}: ')}") from None
    if m["kind"] != kind:
        raise CacheError(f"{shown}: a {m['kind']} cache, but {option} takes a {kind} cache; give it one "
                         f"extracted with `urm extract --kind {kind}`")
    return m


def whole(v) -> bool:
    """A whole number, 0 or more (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


MANIFEST_TYPES = {  # key: (check, what it must be)
    "format_version": (whole, "a whole number"), "kind": (lambda v: v in KINDS, " or ".join(KINDS)),
    "backbone": (lambda v: isinstance(v, str), "a string"), "hidden_size": (lambda v: whole(v) and v > 0,
                                                                           "a positive whole number"),
    "storage_dtype": (lambda v: v in STORAGE_DTYPES, " or ".join(STORAGE_DTYPES)),
    "max_length": (lambda v: whole(v) and v > 0, "a positive whole number"),
    "label_names": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
    "parts": (lambda v: isinstance(v, list), "a list"), "rows": (whole, "a whole number"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
}


PART_TYPES = {"file": (lambda v: isinstance(v, str) and PART_RE.match(v) is not None,
                       "a part file name (part-NNNNN.parquet)"),
              "rows": (whole, "a whole number"), "bytes": (whole, "a whole number")}


def rows_problem(m: dict) -> str | None:
    """A manifest whose row count is not the sum of its parts' is damaged: what it says, or None."""
    held = sum(p["rows"] for p in m["parts"])
    return None if m["rows"] == held else f"says {m['rows']} rows but its parts hold {held}"


def manifest_problem(m) -> str | None:
    """What makes ``m`` not a manifest: a missing or mistyped key, or a part entry without its file name,
    rows, size and checksum; None when it is one."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    for key, (ok, what) in MANIFEST_TYPES.items():
        if key not in m:
            return f"no {key!r}"
        if not ok(m[key]):
            return f"{key!r} must be {what}, got {m[key]!r}"
    for i, part in enumerate(m["parts"]):
        if not isinstance(part, dict):
            return f"parts[{i}] is not an object"
        problem = part_entry_problem(part)
        if problem:
            return f"parts[{i}]{problem}"
    return None


def part_entry_problem(part: dict) -> str | None:
    """What a part entry of a manifest or journal lacks (file name, rows, size, a checksum), or None."""
    for key, (ok, what) in PART_TYPES.items():
        if not ok(part.get(key)):
            return f".{key} must be {what}, got {part.get(key)!r}"
    if not isinstance(part.get("xxh3_128", part.get("sha256")), str):
        return " has no checksum (xxh3_128 or sha256)"
    return None


def part_problem(folder: Path, part: dict, verify: bool) -> str | None:
    """Why a part listed in the manifest cannot be used (missing, resized, and with ``verify`` changed:
    its xxh3-128, or for a part written before that was recorded its sha256), or None."""
    path = folder / part["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != part["bytes"]:
        return f"has {size} bytes, the manifest says {part['bytes']}"
    if verify:
        if "xxh3_128" in part and file_xxh3(path) != part["xxh3_128"]:
            return "has changed since it was written (its checksum differs)"
        if "xxh3_128" not in part and file_sha256(path) != part["sha256"]:
            return "has changed since it was written (its sha256 differs)"
    return None
