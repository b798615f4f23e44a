"""The Parquet fast path (pipeline.cache.parquet_pages) against pyarrow's own decoder, bit for bit, on every
layout: the cache's (PLAIN, uncompressed, data pages v2) read straight from the file, and the
layouts it does not handle (pages v1, compression, dictionary) handed to pyarrow."""

from __future__ import annotations

import mmap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cache.parquet_pages import copy_rows, fixed_list_blocks, plain_pages

D = 12
CACHE_LAYOUT = dict(compression="none", use_dictionary=False, write_statistics=False, data_page_version="2.0")


def write(path, values: np.ndarray, row_group_size: int, page_bytes: int, **options):
    typ = pa.list_(pa.field("element", pa.from_numpy_dtype(values.dtype), nullable=False), D)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), type=typ)
    table = pa.table({"id": pa.array(np.arange(len(values))), "embedding": column})
    pq.write_table(table, path, row_group_size=row_group_size, data_page_size=page_bytes, **options)
    return path


def fast_path_used(path) -> list[bool]:
    """Per row group: does the embedding column chunk take the PLAIN-page path?"""
    md = pq.ParquetFile(path).metadata
    leaf = [md.schema.column(i).path for i in range(md.num_columns)].index("embedding.list.element")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        itemsize = pq.read_schema(path).field("embedding").type.value_type.bit_width // 8
        return [plain_pages(mm, md.row_group(g).column(leaf), md.row_group(g).num_rows, D * itemsize) is not None
                for g in range(md.num_row_groups)]


def blocks_as_array(path, dtype) -> np.ndarray:
    blocks = list(fixed_list_blocks(path, "embedding", D, dtype))
    assert [b.row for b in blocks] == list(np.cumsum([0] + [b.rows for b in blocks])[:-1])  # contiguous
    return np.concatenate([np.array(b.values) for b in blocks]) if blocks else np.empty((0, D), dtype)


def pyarrow_array(path, dtype) -> np.ndarray:
    flat = pq.read_table(path)["embedding"].combine_chunks().flatten()
    return flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, D)


LAYOUTS = {
    "cache layout, many pages and row groups": (CACHE_LAYOUT, True),
    "data pages v1": ({**CACHE_LAYOUT, "data_page_version": "1.0"}, False),
    "zstd": ({**CACHE_LAYOUT, "compression": "zstd"}, False),
    "dictionary": ({**CACHE_LAYOUT, "use_dictionary": True}, False),
}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_blocks_equal_pyarrow_bit_for_bit(tmp_path, layout, dtype):
    options, fast = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((250, D)) * 100).astype(dtype)
    values[7, 3] = np.float16(-0.0) if dtype == np.float16 else -0.0  # signed zero survives too
    path = write(tmp_path / "x.parquet", values, row_group_size=100, page_bytes=400, **options)
    assert fast_path_used(path) == [fast] * 3
    got, want = blocks_as_array(path, dtype), pyarrow_array(path, dtype)
    assert got.dtype == want.dtype and got.shape == (250, D)
    bits = np.uint16 if dtype == np.float16 else np.uint32
    assert np.array_equal(got.view(bits), want.view(bits)) and np.array_equal(got.view(bits), values.view(bits))


def test_an_empty_column_has_no_blocks(tmp_path):
    path = write(tmp_path / "x.parquet", np.empty((0, D), np.float32), row_group_size=10, page_bytes=400,
                 **CACHE_LAYOUT)
    assert blocks_as_array(path, np.float32).shape == (0, D)


def test_copy_rows_runs_and_gathers(tmp_path):
    values = np.arange(40 * D, dtype=np.float32).reshape(40, D)
    path = write(tmp_path / "x.parquet", values, row_group_size=40, page_bytes=1 << 20, **CACHE_LAYOUT)
    blocks = fixed_list_blocks(path, "embedding", D, np.float32)  # the file is open while a block is used
    block = next(blocks)
    assert block.fd is not None  # raw pages: a run of rows is one pread
    out = np.zeros((6, D), np.float32)
    copy_rows(block, np.array([3, 4, 5]), np.array([0, 1, 2]), out, ascending=True)  # a run
    copy_rows(block, np.array([9, 20]), np.array([3, 4]), out, ascending=True)  # a sorted gather
    copy_rows(block, np.array([39]), np.array([5]), out, ascending=False)  # an unsorted selection
    blocks.close()
    assert np.array_equal(out, values[[3, 4, 5, 9, 20, 39]])
