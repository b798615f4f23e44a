"""Reading a fixed-size-list column of a Parquet file fast: its PLAIN pages straight from the file.

Arrow's generic decoder walks a fixed-size list's repetition and definition levels value by value
(~0.3 GB/s on a 2-core machine), though a column written uncompressed, PLAIN, without dictionary
or nulls, in data pages v2, is just the values one row after another behind each page header. So
``fixed_list_blocks`` reads the Parquet page headers (Thrift compact protocol, decoded here: a few
dozen lines, no dependency) to find where each page's values lie, and hands out each page as a
view of the memory-mapped file; ``copy_rows`` then copies a run of rows with one ``pread`` into
its destination. A column chunk in any other layout is decoded by pyarrow instead, so the values
are bit-identical either way (tests/test_parquet_pages.py compares the two). The feature cache
(``pipeline.cache``) writes its embedding column in the fast layout.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq


@dataclass
class Block:
    """Rows [row, row + rows) of a column: ``values`` [rows, width] (a view of the memory-mapped
    file, or decoded by pyarrow), and where they lie in the file when stored raw (``fd``, ``offset``)."""

    row: int
    rows: int
    values: np.ndarray
    fd: int | None = None
    offset: int = 0


def fixed_list_blocks(file: str | os.PathLike, column: str, width: int, dtype: np.dtype) -> Iterator[Block]:
    """The fixed-size-list column ``column`` (``width`` values of ``dtype`` a row) of a Parquet file,
    in blocks of rows: PLAIN pages read straight from the file where the layout allows, else each
    row group decoded by pyarrow. The file stays open (and mapped) while the blocks are used."""
    pf = pq.ParquetFile(file, memory_map=True)
    md = pf.metadata
    leaf = [md.schema.column(i).path for i in range(md.num_columns)].index(f"{column}.list.element")
    dt = np.dtype(dtype).newbyteorder("<")
    with open(file, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        row = 0
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            pages = plain_pages(mm, rg.column(leaf), rg.num_rows, width * dt.itemsize)
            if pages is None:
                values = pf.read_row_group(g, columns=[column])[column].combine_chunks().flatten()
                yield Block(row, rg.num_rows, values.to_numpy(zero_copy_only=False).reshape(-1, width))
            else:
                for offset, r0, nr in pages:
                    view = np.frombuffer(mm, dt, nr * width, offset).reshape(nr, width)
                    yield Block(row + r0, nr, view, f.fileno() if dt.isnative else None, offset)
            row += rg.num_rows


def copy_rows(block: Block, local: np.ndarray, dst: np.ndarray, out: np.ndarray, ascending: bool) -> None:
    """out[dst] = block.values[local]: one pread or memcpy for a run of rows, a gather otherwise."""
    k = len(local)
    if not ascending:
        out[dst] = block.values[local]
        return
    target = out[dst[0]:dst[0] + k]
    if local[-1] - local[0] == k - 1:  # sorted, unique: a run of rows
        row_bytes = block.values.strides[0]
        if block.fd is not None and block.values.dtype == out.dtype and target.flags.c_contiguous:
            nbytes = os.preadv(block.fd, [memoryview(target).cast("B")], block.offset + int(local[0]) * row_bytes)
            if nbytes == k * row_bytes:
                return
        np.copyto(target, block.values[local[0]:local[0] + k])
    elif block.values.dtype == out.dtype:
        np.take(block.values, local, axis=0, out=target)
    else:
        target[...] = block.values[local]


def plain_pages(mm: mmap.mmap, chunk, n_rows: int, row_bytes: int) -> list[tuple[int, int, int]] | None:
    """(file offset of the values, first row, rows) for each page of a column chunk made only of
    uncompressed PLAIN v2 data pages without nulls; None for any other layout (then pyarrow reads)."""
    if chunk.compression != "UNCOMPRESSED" or chunk.dictionary_page_offset is not None:
        return None
    pos, end = chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size
    pages, row = [], 0
    while pos < end:
        try:
            header, size = thrift_struct(mm[pos:min(end, pos + 4096)], 0)
        except (IndexError, ValueError, struct.error):
            return None
        v2, body = header.get(8), header.get(3)
        if header.get(1) != 3 or not isinstance(v2, dict) or body is None:  # 3 = DATA_PAGE_V2
            return None
        levels = v2.get(5, 0) + v2.get(6, 0)
        nr = v2.get(3, -1)
        if v2.get(2) != 0 or v2.get(4) != 0 or body - levels != nr * row_bytes:  # nulls, encoding PLAIN
            return None
        pages.append((pos + size + levels, row, nr))
        row += nr
        pos += size + body
    return pages if pos == end and row == n_rows else None


def thrift_struct(buf: bytes, pos: int) -> tuple[dict, int]:
    """Decode a Thrift compact-protocol struct (a Parquet page header): {field id: value}, end."""
    out, last = {}, 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return out, pos
        kind, delta = head & 0x0F, head >> 4
        if delta:
            fid = last + delta
        else:
            raw, pos = _varint(buf, pos)
            fid = (raw >> 1) ^ -(raw & 1)
        last = fid
        out[fid], pos = _thrift_value(buf, pos, kind)


def _thrift_value(buf: bytes, pos: int, kind: int):
    if kind in (1, 2):  # bool true / false
        return kind == 1, pos
    if kind == 3:  # byte
        return struct.unpack_from("b", buf, pos)[0], pos + 1
    if kind in (4, 5, 6):  # i16, i32, i64: zigzag varint
        raw, pos = _varint(buf, pos)
        return (raw >> 1) ^ -(raw & 1), pos
    if kind == 7:  # double
        return struct.unpack_from("<d", buf, pos)[0], pos + 8
    if kind == 8:  # binary
        n, pos = _varint(buf, pos)
        if pos + n > len(buf):
            raise IndexError("binary past the buffer")
        return bytes(buf[pos:pos + n]), pos + n
    if kind in (9, 10):  # list, set
        head = buf[pos]
        pos += 1
        n, elem = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        items = []
        for _ in range(n):
            if elem in (1, 2):
                items.append(buf[pos] == 1)
                pos += 1
            else:
                item, pos = _thrift_value(buf, pos, elem)
                items.append(item)
        return items, pos
    if kind == 11:  # map
        n, pos = _varint(buf, pos)
        if n == 0:
            return {}, pos
        types = buf[pos]
        pos += 1
        out = {}
        for _ in range(n):
            key, pos = _thrift_value(buf, pos, types >> 4)
            out[key], pos = _thrift_value(buf, pos, types & 0x0F)
        return out, pos
    if kind == 12:
        return thrift_struct(buf, pos)
    raise ValueError(f"unknown thrift type {kind}")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
