"""The on-disk format of the Parquet feature cache: the folder's files, the Parquet schema and writer
options, ``CacheSpec`` (what makes the features), and the cache's error types.

One cached dataset is one folder, e.g. cache/demo/ratings/:
  part-00000.parquet, part-00001.parquet, ...  plain Parquet, columns below
  _manifest.json    what made the features (backbone + revision, template hash, max_length, dtype,
                    dataset fingerprint, ...), each part's rows + size + sha256 + xxh3-128, `complete`, and a
                    content `fingerprint` that downstream artifacts record (``pipeline.cache.manifest``).
  _parts.rank-NNNNN.json  a torchrun rank's journal of the parts it wrote, until rank 0 merges it
                    (``pipeline.cache.journals``).
The manifest's name starts with "_" (the Hive/Spark convention for sidecar files such as
`_SUCCESS`), so Parquet readers that open the whole folder skip it; temporary files start with "."
(``pipeline.atomic.temp_path``).

Columns: id string, source string, subset string?, pair_id string?, role string? ("chosen" |
"rejected"), n_tokens int32, embedding fixed_size_list<float16|float32>[d], labels
fixed_size_list<float32>[5] (NaN = missing; all NaN for pairs), base_score float32? (null = none),
margin float32? (a pair's preference strength, on both of its rows; null = none). Caches written
before the margin column existed still read (margin all null). Each part's footer also records which part it
is (schema metadata ``PART_KEY``), so a part copied over another is refused from its footer alone, even by a
read that skips the checksums (--no-verify); parts written before it was recorded are read without that check.

How to open a cache without this package (plain Parquet; checked with pandas 3.1, polars 2.1 and
duckdb 2.0, float16 and float32 caches):
    import numpy as np, pandas as pd
    df = pd.read_parquet("cache/demo/ratings")               # embedding: one numpy array per row
    X = np.stack(df["embedding"].to_numpy())                # [N, d]
    import polars as pl
    df = pl.read_parquet("cache/demo/ratings/*.parquet")     # embedding: Array(Float16, d)
    import duckdb
    duckdb.sql("SELECT source, role, count(*) FROM 'cache/demo/ratings/*.parquet' GROUP BY ALL")

Speed: the embedding column is written uncompressed, PLAIN, without dictionary or statistics, in
data pages v2 of 8 MB, the layout ``pipeline.cache.parquet_pages`` reads straight from the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline import ATTRIBUTES
from pipeline.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "_manifest.json"
PART_KEY = b"urm.part"  # a part's footer (Parquet key-value metadata): its index, as in its file name
FIX = "pass --overwrite to replace it, or choose another --cache-dir"
REBUILD = "rebuild the cache: the same `urm extract` with --overwrite"
KINDS = ("ratings", "preferences")
STORAGE_DTYPES = ("float16", "float32")
ROLES = ("chosen", "rejected")
ROW_GROUP_BYTES = 256 << 20  # embedding bytes per row group: large groups read fastest
DATA_PAGE_BYTES = 8 << 20  # large pages: fewer page headers to walk when reading
SMALL_COLUMNS = ("id", "source", "subset", "pair_id", "role", "n_tokens", "labels", "base_score", "margin")
REQUIRED_COLUMNS = ("id", "source", "n_tokens", "embedding")
# Fields that decide what the features are: a cache that differs in any of them is refused.
COMPAT_FIELDS = ("format_version", "kind", "backbone", "backbone_revision", "hidden_size",
                 "storage_dtype", "max_length", "chat_template_hash", "dataset_fingerprint",
                 "label_names", "extra")
PART_RE = re.compile(r"^part-(\d+)\.parquet$")
JOURNAL_RE = re.compile(r"^_parts\.rank-(\d+)\.json$")


class CacheError(UserError):
    """A cache that cannot be read or written as asked; the message names the file and the fix."""


class CacheMismatch(CacheError):
    """An existing cache was made with other settings than this run's."""


class CacheIncomplete(CacheError):
    """The cache's writer has not finished (or was killed): some parts are missing."""


class CacheInputError(CacheError, ValueError):
    """Columns handed to `write_part` have the wrong shape, type or values."""


@dataclass
class CacheSpec:
    """What makes the features: every field but `dataset` must match to resume or reuse a cache.

    `extra` holds anything else that changes the content (compute dtype, rows per part, ...); it
    is compared too. Run information that does not (timings) goes to `finish(extra=...)`.
    """

    backbone: str
    backbone_revision: str | None  # commit hash, or a hash of the weights file
    hidden_size: int
    storage_dtype: str  # "float16" | "float32"
    max_length: int
    chat_template_hash: str
    dataset: str
    dataset_fingerprint: str
    kind: str  # "ratings" | "preferences"
    label_names: list[str] = field(default_factory=lambda: list(ATTRIBUTES))
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if int(self.hidden_size) <= 0 or int(self.max_length) <= 0:
            raise ValueError(f"hidden_size and max_length must be positive, got {self.hidden_size}, {self.max_length}")
        self.hidden_size, self.max_length = int(self.hidden_size), int(self.max_length)
        self.label_names = list(self.label_names)
        self.extra = json_normal(self.extra)


def arrow_schema(hidden_size: int, storage_dtype: str, n_labels: int = len(ATTRIBUTES)) -> pa.Schema:
    """The schema of every part file."""
    value = pa.float16() if storage_dtype == "float16" else pa.float32()
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("subset", pa.string()),
        pa.field("pair_id", pa.string()),
        pa.field("role", pa.string()),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("element", value, nullable=False), hidden_size), nullable=False),
        pa.field("labels", pa.list_(pa.field("element", pa.float32(), nullable=False), n_labels), nullable=False),
        pa.field("base_score", pa.float32()),
        pa.field("margin", pa.float32()),
    ])


def parquet_options() -> dict:
    """pyarrow ParquetWriter options: the embedding PLAIN and uncompressed in large v2 pages (what
    ``pipeline.cache.parquet_pages`` reads straight from the file), the small columns zstd."""
    leaf = {"embedding": "embedding.list.element", "labels": "labels.list.element"}
    compression = {leaf.get(c, c): "zstd" for c in SMALL_COLUMNS}
    compression[leaf["embedding"]] = "none"
    return dict(
        compression=compression,
        use_dictionary=["source", "subset", "role"],
        write_statistics=["source", "subset", "role", "n_tokens", "base_score", "margin"],
        data_page_version="2.0",
        data_page_size=DATA_PAGE_BYTES,
    )


def part_name(index: int) -> str:
    """The file name of part ``index``: ``part-NNNNN.parquet``."""
    return f"part-{index:05d}.parquet"


def journal_name(rank: int) -> str:
    """The file in which torchrun rank ``rank`` lists the parts it wrote, until rank 0 merges it."""
    return f"_parts.rank-{rank:05d}.json"


def row_group_rows(spec: CacheSpec) -> int:
    """Rows per Parquet row group: ``ROW_GROUP_BYTES`` of embeddings (large groups read fastest)."""
    return max(1, ROW_GROUP_BYTES // (spec.hidden_size * np.dtype(spec.storage_dtype).itemsize))


def json_normal(obj):
    """``obj`` as JSON gives it back (tuples as lists, ...): what a manifest will hold; ValueError if not JSON."""
    try:
        return json.loads(json.dumps(obj))
    except TypeError as e:
        raise ValueError(f"cache spec/info must be JSON-serialisable: {e}") from None


def now() -> str:
    """The UTC time now, ISO 8601 to the second (the manifest's created / updated / completed)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_cache_file(name: str) -> bool:
    """Whether ``name`` is one of the files a cache folder holds (a part, the manifest, a rank's journal)."""
    return name == MANIFEST or PART_RE.match(name) is not None or JOURNAL_RE.match(name) is not None
