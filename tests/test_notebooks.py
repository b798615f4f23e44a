"""The notebooks run, cell by cell, against a cache a test wrote (no Jupyter needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import CacheSpec, open_writer

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def ratings_cache(path: Path, n: int = 80, d: int = 12) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    labels = np.clip(np.round(2 + x[:, :5] + 0.3 * rng.standard_normal((n, 5))), 0, 4).astype(np.float32)
    labels[::7, 3] = np.nan
    spec = CacheSpec(backbone="test/tiny", backbone_revision="r", hidden_size=d, storage_dtype="float16",
                     max_length=64, chat_template_hash="t", dataset="synthetic", dataset_fingerprint="f",
                     kind="ratings")
    writer = open_writer(path, spec)
    writer.write_part(0, {"id": [f"r{i}" for i in range(n)], "source": "synthetic",
                          "n_tokens": np.full(n, 20, dtype=np.int32), "embedding": x, "labels": labels})
    writer.finish(1)
    return path


@pytest.mark.integration
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_a_cache(notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("URM_NOTEBOOK_CACHE", str(ratings_cache(tmp_path / "ratings")))
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells, f"{notebook.name} has no code"
    scope: dict = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{notebook.name}[{i}]", "exec"), scope)
    assert scope["features"].embedding.shape == (80, 12)
    # the probe finds the signal planted in the first five feature dimensions
    assert all(r2 > 0.5 for r2 in scope["probe"].values()), scope["probe"]
