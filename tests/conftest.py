"""Shared fixtures: the real preference data beside the repo, a small JSON-lines writer, the lines the pipeline
says, and `urm demo` on a tiny model."""

from __future__ import annotations

import contextlib
import json
import logging
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
def said(caplog):
    """``said()`` -> the lines the pipeline's loggers have said so far in the test, INFO and up (what `urm` prints);
    ``caplog.clear()`` forgets them."""
    caplog.set_level(logging.INFO, logger="pipeline")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("pipeline")]


@contextlib.contextmanager
def lines_said():
    """The lines the pipeline's loggers say in the block, INFO and up, as a list (``said`` for a fixture that outlives
    one test, where caplog cannot reach)."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    package, handler = logging.getLogger("pipeline"), Collect()
    before = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        package.removeHandler(handler)
        package.setLevel(before)


@pytest.fixture
def write_jsonl(tmp_path):
    """``write_jsonl(name, rows)`` -> path; a row is a dict (written as JSON) or a str (written verbatim)."""

    def write(name: str, rows: list) -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """`urm demo` (the recipe) on a tiny random reward-model Llama and a preset shaped like the demo's: (root, preset,
    result). Its caches, heads, export and report serve the demo, notebook and evaluation tests."""
    from pipeline.recipes.demo import run_demo
    from tiny_models import TINY_PRESET, build_tiny_llama

    root = tmp_path_factory.mktemp("demo")
    model = build_tiny_llama(root / "backbone", reward_model=True)
    preset = root / "tiny-demo.toml"
    preset.write_text(TINY_PRESET.format(model=model, root=root))
    with lines_said() as lines:
        result = run_demo(str(preset))
    return root, preset, {**result, "log": lines}
