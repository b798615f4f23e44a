"""The notebooks run, cell by cell, against a cache a test wrote and the heads and held-out caches of `urm demo`
on a tiny model (no Jupyter needed); what they show is what `urm evaluate` reports."""

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
def test_notebook_runs_on_a_cache(notebook, tmp_path, monkeypatch, tiny_demo):
    root, _, result = tiny_demo
    monkeypatch.setenv("URM_NOTEBOOK_CACHE", str(ratings_cache(tmp_path / "ratings")))
    monkeypatch.setenv("URM_NOTEBOOK_HEADS", str(root / "heads"))
    monkeypatch.setenv("URM_NOTEBOOK_EVAL_RATINGS", str(root / "cache" / "eval_ratings"))
    monkeypatch.setenv("URM_NOTEBOOK_EVAL_PAIRS", str(root / "cache" / "eval_preferences"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells, f"{notebook.name} has no code"
    scope: dict = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{notebook.name}[{i}]", "exec"), scope)
    assert scope["features"].embedding.shape == (80, 12)
    # the probe finds the signal planted in the first five feature dimensions
    assert all(r2 > 0.5 for r2 in scope["probe"].values()), scope["probe"]
    # the heads' uncertainty and calibration are the evaluation's own numbers
    urm = result["report"]["models"][0]
    assert urm["name"] == "URM (these heads)"
    coverage = scope["coverage"]
    for name, row in urm["attributes"]["per_attribute"].items():
        assert coverage.loc[name, "inside 90% interval"] == pytest.approx(row["coverage90"], abs=1e-6)
        assert coverage.loc[name, "inside 50% interval"] == pytest.approx(row["coverage50"], abs=1e-6)
    pairs = urm["pairs"]["eval_preferences"]
    assert scope["calibration"]["accuracy"] == pytest.approx(pairs["accuracy"])
    assert scope["calibration"]["ECE (BT)"] == pytest.approx(pairs["calibration"]["ece"], abs=1e-9)
    assert scope["calibration"]["ECE (Gaussian)"] == pytest.approx(pairs["calibration"]["ece_gaussian"], abs=1e-9)
