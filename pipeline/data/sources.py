"""Where rows come from: raw records out of jsonl(.gz) / json / parquet files and hub datasets, the
row loop every loader shares (skip, limit, duplicate ids), and the dataset fingerprint.

A *source* string is one of:
  - a local file: ``*.jsonl``, ``*.jsonl.gz``, ``*.json`` (a list of records, ``{"data": [...]}``, or
    JSON lines), ``*.json.gz``, ``*.parquet``;
  - a hub dataset id ``org/name`` (optionally ``org/name@revision``), read with ``datasets.load_dataset``;
  - ``synthetic:ratings?n=N&seed=S`` or ``synthetic:preferences?n=N&seed=S`` (see ``parse_synthetic``).

Row numbers are 1-based: the line number in a JSON-lines file, the record index otherwise.
A problem with the whole file (missing, not gzip, truncated, not parquet, hub unreachable) raises
``DataError(path, None, None, ...)``; a problem with one row is located by row and field.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar
from urllib.parse import parse_qs, urlsplit

from pipeline.data.records import LoadReport
from pipeline.data.synthetic import make_preferences, make_ratings
from pipeline.errors import DataError
from pipeline.hashing import file_sha256, json_sha256

T = TypeVar("T")
Record = tuple[int, "dict | DataError"]

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# Endings that make a source a file (read, or refused as of an unknown type), never a hub id: a hub name may hold
# dots ("org/tulu-2.5"), but not one of these.
FILE_ENDINGS = FILE_SUFFIXES + (".gz", ".txt", ".csv", ".tsv", ".ndjson", ".jsonlines", ".zip", ".bz2", ".xz", ".zst",
                                ".tar", ".arrow", ".feather", ".pq", ".xls", ".xlsx", ".yaml", ".yml", ".toml", ".md",
                                ".html", ".xml", ".pkl", ".pickle", ".pt", ".npy", ".npz", ".h5", ".hdf5", ".db",
                                ".sqlite", ".avro", ".orc")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
SYNTHETIC_KINDS = ("ratings", "preferences")
LOADER_VERSION = 1  # bump when parsing changes what a file yields: it is part of the fingerprint
_READ_ERRORS = (OSError, EOFError, zlib.error)


class RowError(ValueError):
    """A problem with one record, raised by a parser before it knows the file and row."""

    def __init__(self, field: str | None, message: str):
        self.field, self.reason = field, message
        super().__init__(f"field '{field}': {message}" if field else message)


# ----------------------------------------------------------------------------------------------
# What a source string names


def source_kind(source: str) -> str:
    """``"synthetic"``, ``"file"`` or ``"hub"``. A path that exists, ends like a file (``FILE_ENDINGS``:
    ``data/nope.txt`` is a missing file, not a hub id), or lies in a folder that exists here
    (``data/pairs`` with a local ``data/``) is a file, as is anything with ``./``, ``/`` or ``~`` in front
    or more than one slash; only an ``org/name`` that is none of these is a hub id."""
    if source.startswith("synthetic:"):
        return "synthetic"
    path = Path(source).expanduser()
    if path.exists() or source.lower().endswith(FILE_ENDINGS) or path.parent.is_dir() and str(path.parent) != ".":
        return "file"
    if source.startswith((".", "/", "~")) or not HUB_ID.fullmatch(source):
        return "file"
    return "hub"


def split_hub_id(source: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); no ``@`` -> revision None."""
    repo, _, revision = source.partition("@")
    return repo, revision or None


def source_stem(source: str, split: str = "train") -> str:
    """The prefix of default row ids: the file name without its data suffixes, or ``name-split`` for a hub id."""
    if source_kind(source) == "hub":
        return f"{split_hub_id(source)[0].split('/')[-1]}-{split}"
    name = Path(source).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def source_label(source: str) -> str:
    """A short name for a source (the cache's ``source`` column): file stem, ``org/name``, or ``synthetic:<kind>``."""
    kind = source_kind(source)
    if kind == "synthetic":
        return "synthetic:" + urlsplit(source).path
    return split_hub_id(source)[0] if kind == "hub" else source_stem(source)


def parse_synthetic(source: str) -> tuple[str, int, int]:
    """``synthetic:ratings?n=100&seed=0`` -> (``"ratings"``, 100, 0). ``seed`` defaults to 0."""
    parts = urlsplit(source)
    kind, query = parts.path, parse_qs(parts.query)
    if kind not in SYNTHETIC_KINDS:
        raise DataError(source, None, None, f"unknown synthetic kind {kind!r}; use synthetic:ratings?n=N&seed=S "
                        "or synthetic:preferences?n=N&seed=S")
    unknown = set(query) - {"n", "seed"}
    if unknown:
        raise DataError(source, None, None, f"unknown synthetic option(s) {sorted(unknown)}; known: n, seed")
    try:
        n, seed = int(query["n"][-1]), int(query.get("seed", ["0"])[-1])
    except (KeyError, ValueError):
        raise DataError(source, None, None, "synthetic sources need an integer n (and optional integer seed), "
                        "e.g. synthetic:ratings?n=100&seed=0") from None
    if n < 1:
        raise DataError(source, None, None, f"n must be at least 1, got {n}")
    return kind, n, seed


def synthetic_items(source: str, kind: str, limit: int | None = None) -> list:
    """The rows of a ``synthetic:`` source (``pipeline.data.synthetic``'s generator), first ``limit`` kept."""
    got, n, seed = parse_synthetic(source)
    if got != kind:
        loader = "load_ratings" if got == "ratings" else "load_preferences"
        raise DataError(source, None, None, f"this source makes {got}, not {kind}; load it with {loader}")
    make = make_ratings if kind == "ratings" else make_preferences
    items = make(n, seed)
    return list(items)[:limit] if limit is not None else list(items)


# ----------------------------------------------------------------------------------------------
# Reading records


def iter_records(source: str, split: str = "train") -> Iterator[Record]:
    """Yield ``(row, record)`` for each row of a file or hub dataset.

    ``record`` is a dict, or a ``DataError`` for a row that could not be parsed at all (a malformed
    JSON line, a value that is not an object) so that a loader can skip and count it. Problems with the
    whole file raise ``DataError`` with row None.
    """
    kind = source_kind(source)
    if kind == "synthetic":
        raise DataError(source, None, None, "synthetic sources have no raw records; "
                        "use load_ratings / load_preferences")
    if kind == "hub":
        return _iter_hub(source, split)
    path = _existing_file(source)
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _iter_parquet(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _iter_jsonl(path)
    if name.endswith((".json", ".json.gz")):
        return _iter_json(path)
    raise DataError(source, None, None, f"unknown file type; supported: {', '.join(FILE_SUFFIXES)}")


def _existing_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(source, None, None, "file not found (and not a hub id of the form org/name)")
    if not path.is_file():
        raise DataError(source, None, None, f"not a file; give one of {', '.join(FILE_SUFFIXES)}")
    return path


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _record(path: Path, row: int, value) -> Record:
    if isinstance(value, dict):
        return row, value
    return row, DataError(path, row, None, f"expected a JSON object, got {type(value).__name__}")


def _json_line(path: Path, row: int, line: bytes) -> Record:
    try:
        text = line.decode("utf-8-sig")  # a byte-order mark (files saved on Windows) is not data
    except UnicodeDecodeError as err:
        return row, DataError(path, row, None, not_utf8(line, err))
    try:
        return _record(path, row, json.loads(text))
    except ValueError as err:
        return row, DataError(path, row, None, f"malformed JSON line: {err}")


def not_utf8(data: bytes, err: UnicodeDecodeError) -> str:
    """What to say about text that is not UTF-8: where, and what encoding it looks like."""
    guess = "it starts like UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "perhaps Latin-1 or Windows-1252"
    return (f"not UTF-8 text (byte 0x{data[err.start]:02x} at position {err.start}; {guess}): re-encode the file "
            "as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > NEW`")


def _unreadable(path: Path, err: Exception) -> DataError:
    return DataError(path, None, None, f"cannot read file ({type(err).__name__}: {err}); truncated or corrupt?")


def _iter_lines(path: Path, lines: Iterable[bytes]) -> Iterator[Record]:
    for row, line in enumerate(lines, 1):
        if line.strip():
            yield _json_line(path, row, line)


def _iter_jsonl(path: Path) -> Iterator[Record]:
    try:
        with _open(path) as fh:
            yield from _iter_lines(path, fh)
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from err


def _iter_json(path: Path) -> Iterator[Record]:
    """A JSON array, ``{"data": [...]}``, or JSON lines saved as ``.json`` (what ``Dataset.to_json`` writes)."""
    try:
        with _open(path) as fh:
            data = fh.read()
    except _READ_ERRORS as err:
        raise _unreadable(path, err) from err
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (files saved on Windows) is not data
    except UnicodeDecodeError as err:
        raise DataError(path, None, None, not_utf8(data, err)) from None
    try:
        value = json.loads(text)
    except ValueError as err:
        if text.lstrip()[:1] == "{":
            yield from _iter_lines(path, data.splitlines())
            return
        raise DataError(path, None, None, f"not valid JSON: {err}") from err
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    elif isinstance(value, dict):
        value = [value]  # a one-line JSON-lines file
    if not isinstance(value, list):
        raise DataError(path, None, None, f"expected a list of records or {{\"data\": [...]}}, "
                        f"got {type(value).__name__}")
    for row, item in enumerate(value, 1):
        yield _record(path, row, item)


def _iter_parquet(path: Path) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (pyarrow.ArrowException, *_READ_ERRORS) as err:
        raise DataError(path, None, None, f"not a readable parquet file ({type(err).__name__}: {err})") from err


def _iter_hub(source: str, split: str) -> Iterator[Record]:
    repo, revision = split_hub_id(source)
    try:
        import datasets

        ds = datasets.load_dataset(repo, split=split, revision=revision)
    except Exception as err:  # the hub client raises many kinds: network, auth, missing split, ...
        raise DataError(source, None, None, f"could not load hub dataset {repo!r} split {split!r} "
                        f"({type(err).__name__}: {err}); no local file {source!r} exists either; for offline use "
                        "give a local file") from err
    for row, record in enumerate(ds, 1):
        yield row, record


def peek_record(records: Iterator[Record]) -> tuple[Record | None, Iterator[Record]]:
    """The first parseable (row, record), and an iterator that still yields everything (that one included)."""
    seen = []
    for item in records:
        seen.append(item)
        if not isinstance(item[1], DataError):
            return item, chain(seen, records)
    return None, iter(seen)


# ----------------------------------------------------------------------------------------------
# The row loop shared by the loaders


def record_id(record: dict, columns: tuple[str, ...], default: str) -> tuple[str, str | None]:
    """(id, column it came from): the first of ``columns`` present and not null, else ``default``."""
    for column in columns:
        value = record.get(column)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise RowError(column, f"id must be a string or an integer, got {type(value).__name__}")
        return str(value), column
    return default, None


def collect(
    records: Iterable[Record],
    path: str,
    parse: Callable[[dict, int], tuple[T, str, str | None]],
    report: LoadReport,
    *,
    skip_invalid: bool = False,
    limit: int | None = None,
    is_empty: Callable[[T], bool] = lambda item: False,
) -> list[T]:
    """Parse each record into an item, keep the first ``limit`` valid ones, fill in ``report``.

    ``parse(record, row)`` returns ``(item, id, id_column)`` or raises ``RowError``; bad rows raise
    ``DataError`` or, with ``skip_invalid``, are counted in ``report`` and skipped. Ids must be unique.
    """
    items: list[T] = []
    first_row: dict[str, int] = {}
    if limit is not None and limit <= 0:
        return items
    for row, record in records:
        try:
            item, item_id = _parse_located(parse, record, row, path, first_row)
        except DataError as err:
            if not skip_invalid:
                raise
            report.skip(err)
            continue
        first_row[item_id] = row
        items.append(item)
        report.rows_loaded += 1
        report.empty_responses += bool(is_empty(item))
        if len(items) == limit:
            break
    return items


def load_rows(source: str, kind: str, formats: tuple[str, ...], detect: Callable[[dict], str],
              parse: Callable[..., tuple[T, str, str | None]], is_empty: Callable[[T], bool], *,
              format: str | None = None, split: str = "train", skip_invalid: bool = False,
              limit: int | None = None) -> tuple[list[T], LoadReport]:
    """What every loader does: check a format name, detect the format from the first parseable record
    when none is given (``detect`` raises ValueError when it cannot tell), and parse the rows
    (``parse(record, row, stem=, format=)``) with ``collect``; a ``synthetic:`` source is generated
    (``kind``: "ratings" or "preferences")."""
    if format is not None and format not in formats:
        raise DataError(source, None, "format", f"unknown format {format!r}; known formats: {', '.join(formats)}")
    if source_kind(source) == "synthetic":
        items = synthetic_items(source, kind, limit)
        return items, LoadReport(path=source, format="synthetic", rows_loaded=len(items),
                                 empty_responses=sum(map(is_empty, items)))
    first, records = peek_record(iter_records(source, split))
    if format is None and first is not None:
        try:
            format = detect(first[1])
        except ValueError as err:  # told from the first parseable row: name it
            raise DataError(source, first[0], None, str(err)) from None
    report = LoadReport(path=source, format=format or "empty")  # "empty": no parseable record at all
    items = collect(records, source, partial(parse, stem=source_stem(source, split), format=format or formats[0]),
                    report, skip_invalid=skip_invalid, limit=limit, is_empty=is_empty)
    return items, report


def _parse_located(parse, record, row: int, path: str, first_row: dict[str, int]):
    if isinstance(record, DataError):
        raise record
    try:
        item, item_id, id_column = parse(record, row)
    except RowError as err:
        raise DataError(path, row, err.field, err.reason) from None
    except (TypeError, KeyError, AttributeError, IndexError) as err:  # a shape no check foresaw
        raise DataError(path, row, None, f"unexpected record shape ({type(err).__name__}: {err})") from err
    if item_id in first_row:
        raise DataError(path, row, id_column or "id", f"duplicate id {item_id!r} (first at row {first_row[item_id]})")
    return item, item_id


def require_text(record: dict, key: str, field: str | None = None) -> str:
    """``record[key]``, which must be present and a string (an empty string is a real value)."""
    field = field or key
    if key not in record:
        raise RowError(field, "missing field")
    value = record[key]
    if value is None:
        raise RowError(field, "is null; expected a string")
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__} {_short(value)}")
    return value


def _short(value, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def is_blank(text: str) -> bool:
    """An empty response: nothing but whitespace (kept as data, counted in the load report)."""
    return not text.strip()


# ----------------------------------------------------------------------------------------------
# Fingerprint


def hub_commit(repo: str, revision: str | None = None) -> str | None:
    """The commit the Hub resolves dataset ``repo`` at ``revision`` (a branch, tag or commit; None: the
    default branch) to, or None when the Hub cannot be asked (offline, ``HF_HUB_OFFLINE=1``, no such
    dataset): then nothing is known beyond the revision asked for."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo, revision=revision, timeout=10).sha or None
    except Exception:  # offline mode, no network, gated, unknown: the hub client raises many kinds
        return None


def pin_revision(source: str, revision: str | None = None) -> tuple[str, str | None]:
    """(the source to read, its commit): a hub dataset pinned to the commit the Hub resolves now,
    ``org/name@<commit>``, so the rows read and the fingerprint are those of one upstream commit (a
    dataset that changes upstream then gives another fingerprint, never a stale cache); ``revision``
    (a preset's pin) and a source's own ``@revision`` name what to resolve. Offline the revision asked
    for is kept as it is (commit None), and files and synthetic sources are returned unchanged.

    >>> pin_revision("synthetic:ratings?n=4")
    ('synthetic:ratings?n=4', None)
    """
    if source_kind(source) != "hub":
        if revision is not None:
            raise DataError(source, None, "revision", "only hub datasets have revisions; remove `revision`")
        return source, None
    repo, asked = split_hub_id(source)
    if revision is not None and asked is not None and revision != asked:
        raise DataError(source, None, "revision", f"the source pins @{asked} and the preset revision {revision!r}: "
                        "keep one")
    asked = revision or asked
    commit = hub_commit(repo, asked)
    pinned = commit or asked
    return (f"{repo}@{pinned}" if pinned else repo), commit


def fingerprint(source: str, split: str = "train", format: str | None = None, limit: int | None = None) -> str:
    """A hex sha256 naming exactly what a loader reads from ``source``.

    Local files: the content hash plus the file stem (it prefixes default row ids), not the path, so
    moving a file keeps its cache. Hub ids: id, revision and split, so a source pinned to its commit
    (``pin_revision``, as `urm extract` does whenever the Hub answers) changes its fingerprint when the
    dataset changes upstream. Synthetic: the source string. ``format``, ``limit`` and
    ``LOADER_VERSION`` are always included.
    """
    kind = source_kind(source)
    ident: dict = {"kind": kind, "format": format, "limit": limit, "loader": LOADER_VERSION}
    if kind == "file":
        ident.update(sha256=file_sha256(_existing_file(source)), stem=source_stem(source))
    elif kind == "hub":
        repo, revision = split_hub_id(source)
        ident.update(hub=repo, revision=revision, split=split)
    else:
        ident.update(synthetic=source)
    return json_sha256(ident)
