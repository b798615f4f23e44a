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


TINY_DEMO_PRESET = """
backbone = "{model}"
cache_dir = "{root}/cache"
heads_dir = "{root}/heads"
report_dir = "{root}/eval"
out_dir = "{root}/model"
device = "cpu"
dtype = "auto-bf16"

[datasets.ratings]
kind = "ratings"
source = "synthetic:ratings?n=120&seed=0"

[datasets.preferences]
kind = "preferences"
source = "synthetic:preferences?n=120&seed=1"

[datasets.eval_ratings]
kind = "ratings"
source = "synthetic:ratings?n=40&seed=2"

[datasets.eval_preferences]
kind = "preferences"
source = "synthetic:preferences?n=40&seed=3"

[value_head]
batch_size = 32
epochs = 20

[gating]
gate_batch_size = 16
gate_epochs = 4
gate_hidden = 16

[evaluate]
eval_preferences = ["eval_preferences"]
eval_ratings = "eval_ratings"
"""


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """`urm demo` (the recipe) on a tiny random Llama and a preset shaped like the demo's: (root, preset, result)."""
    from pipeline.recipes.demo import run_demo
    from tiny_models import build_tiny_llama

    root = tmp_path_factory.mktemp("demo")
    model = build_tiny_llama(root / "backbone")
    preset = root / "tiny-demo.toml"
    preset.write_text(TINY_DEMO_PRESET.format(model=model, root=root))
    lines = []
    result = run_demo(str(preset), log=lines.append)
    return root, preset, {**result, "log": lines}
