"""Checksums: of a file's bytes (sha256, and xxh3-128, the fast one every cache read verifies) and of a
JSON-ready value (the fingerprints that name what made a cache, a rendering, a dataset).

Every stage that records or checks a checksum (the cache's parts, the heads, an export's files, a
converted backbone, a dataset's fingerprint) takes it from here, so none imports another stage to
hash a file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import DataError


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed); DataError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            if hasattr(hashlib, "file_digest"):  # Python >= 3.11
                return hashlib.file_digest(fh, "sha256").hexdigest()
            digest = hashlib.sha256()
            while block := fh.read(1 << 22):
                digest.update(block)
            return digest.hexdigest()
    except OSError as err:
        raise DataError(path, None, None, f"cannot read file ({type(err).__name__}: {err})") from err


def file_xxh3(path: str | Path) -> str:
    """xxh3-128 of a file's bytes (streamed): the fast checksum every read of a cache part verifies
    (~30 GB/s in memory where sha256 manages ~2, so checking a part costs little beside reading it)."""
    import xxhash

    digest, buffer = xxhash.xxh3_128(), bytearray(1 << 22)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as fh:  # into one reused buffer: no allocation per block
            while n := fh.readinto(buffer):
                digest.update(view[:n])
    except OSError as err:
        raise DataError(path, None, None, f"cannot read file ({type(err).__name__}: {err})") from err
    return digest.hexdigest()


def json_sha256(value) -> str:
    """sha256 (hex) of ``value`` as JSON with sorted keys: the same value always gives the same digest.

    >>> json_sha256({"b": 1, "a": [2]}) == json_sha256({"a": [2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
