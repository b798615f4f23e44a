"""Shared fixtures: the real preference data beside the repo, and a small JSON-lines writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real, public preference files); skips when absent (a user's clone has none)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not found (real preference data lives beside the repo)")
    return SHARED_DATA


@pytest.fixture
def write_jsonl(tmp_path):
    """``write_jsonl(name, rows)`` -> path; a row is a dict (written as JSON) or a str (written verbatim)."""

    def write(name: str, rows: list) -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write
