"""The Parquet feature cache: one folder per dataset, written in crash-safe parts and read back into tensors.

  layout         the on-disk format: files, the Parquet schema, ``CacheSpec``, the error types
  columns        a part's columns checked and turned into an Arrow table
  manifest       the manifest: new, read and checked, compared with a run's settings, the fingerprint
  parts          one part file written atomically; the folder's clean-up
  journals       torchrun ranks' journals of the parts they wrote
  writer         ``open_writer``: create or resume a cache, one writer at a time, ``finish`` it; ``remove_unbegun``
  reader         ``read_features`` / ``read_pairs`` / ``row_index``: a complete, verified cache into tensors
  parquet_pages  the fast path under the reader: PLAIN pages read straight from the file

Imports only the cross-cutting modules of ``pipeline`` (errors, atomic, hashing); torch only in the reader.
"""

from pipeline.cache.columns import nonfinite_rows
from pipeline.cache.journals import open_rank_writer
from pipeline.cache.layout import (KINDS, MANIFEST, REBUILD, STORAGE_DTYPES, CacheError, CacheIncomplete,
                                   CacheInputError, CacheMismatch, CacheSpec, arrow_schema, journal_name)
from pipeline.cache.manifest import part_problem, read_manifest, require_kind, rows_problem
from pipeline.cache.reader import (fixed_list_numpy, gather_embeddings, parts_layout_problems, read_features,
                                   read_pairs, row_index, row_location, verify_cache)
from pipeline.cache.writer import CacheWriter, open_writer, remove_unbegun

__all__ = [
    "arrow_schema", "CacheError", "CacheIncomplete", "CacheInputError", "CacheMismatch", "CacheSpec", "CacheWriter",
    "fixed_list_numpy", "gather_embeddings", "journal_name", "KINDS", "MANIFEST", "nonfinite_rows", "open_rank_writer",
    "open_writer", "part_problem", "parts_layout_problems", "read_features", "read_manifest", "read_pairs", "REBUILD",
    "remove_unbegun", "require_kind", "row_index", "row_location", "rows_problem", "STORAGE_DTYPES", "verify_cache",
]
