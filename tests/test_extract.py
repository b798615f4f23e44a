"""Extraction on a tiny random Llama: batched == one at a time, last-token rules, base_score, resume."""

from __future__ import annotations

import dataclasses
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

from pipeline.cache import read_features, read_manifest, read_pairs
from pipeline.configs import DatasetSpec, ExtractConfig
from pipeline.data import make_preferences, make_ratings
from pipeline.features import (backbone_forward, embed_all, keep_mask, load_backbone, pad_right, part_bounds,
                               plan_batches, render_ids)
from pipeline.model import last_token_index
from pipeline.recipes.extract import run_extract
from tiny_models import build_tiny_llama, slow_forward

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "rm", reward_model=True, seed=1)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_backbone(str(tiny_dir), dtype="float32", device="cpu")


def conversations(n=24, seed=0):
    return [r.messages for r in make_ratings(n, seed)]


# ---------------------------------------------------------------------------------------------- pure


def test_plan_batches_respects_budget_and_covers_rows():
    lengths = np.array([5, 50, 7, 33, 12, 12, 80, 3, 40, 41])
    batches = plan_batches(lengths, max_tokens=100)
    got = np.sort(np.concatenate(batches))
    assert got.tolist() == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 100
    assert lengths[batches[0]].max() == 80  # longest first: an OOM shows at once
    # sorted: each batch's rows are no longer than the previous batch's shortest
    for prev, nxt in zip(batches, batches[1:]):
        assert lengths[nxt].max() <= lengths[prev].min()


def test_plan_batches_bound_each_rows_padding():
    """Rows of mixed lengths that one budget would hold (a server's requests) split where a row would be padded
    by more than a quarter of the longest: the tokens processed stay within 4/3 of the real ones."""
    lengths = np.array([292, 78, 250, 120, 230, 100, 95, 200])
    batches = plan_batches(lengths, max_tokens=8192)
    got = [sorted(lengths[b].tolist(), reverse=True) for b in batches]
    assert got == [[292, 250, 230], [200], [120, 100, 95], [78]]
    for b in batches:
        assert lengths[b].min() >= 0.75 * lengths[b].max()
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded <= 4 / 3 * lengths.sum()
    one_batch = len(lengths) * lengths.max()  # what a budget alone gave: 1.7x the real tokens
    assert one_batch > 1.6 * lengths.sum()
    assert len(plan_batches(lengths, max_tokens=8192, max_row_padding=1.0)) == 1


def test_plan_batches_row_over_budget_gets_own_batch():
    batches = plan_batches(np.array([500, 10, 10]), max_tokens=100)
    assert [len(b) for b in batches] == [1, 2]


def test_last_token_index_reads_the_mask_not_the_pad_id():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 3, 4]


def test_keep_mask_drops_whole_pairs():
    lengths = np.array([10, 99, 10, 10, 99, 99])
    assert keep_mask(lengths, 50, paired=True).tolist() == [False, False, True, True, False, False]
    assert keep_mask(lengths, 50, paired=False).tolist() == [True, False, True, True, False, False]


def test_part_bounds_never_split_a_pair():
    assert part_bounds(10, 5, paired=True) == [(0, 4), (4, 8), (8, 10)]
    assert part_bounds(10, 4, paired=False) == [(0, 4), (4, 8), (8, 10)]


# ---------------------------------------------------------------------------------------------- model


def test_rendering_gives_one_bos_and_ends_with_eos_equal_to_pad(tiny):
    tok = tiny.tokenizer
    ids = render_ids(tok, conversations(4))
    for x in ids:
        assert x[0] == tok.bos_token_id and x[1] != tok.bos_token_id
        assert x[-1] == tok.eos_token_id == tok.pad_token_id  # the trap: last token equals the pad id
    # the seed snippet's way (tokenising templated text again) gives two BOS tokens
    text = tok.apply_chat_template(conversations(1)[0], tokenize=False)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2


def test_batched_features_equal_one_at_a_time(tiny):
    ids = render_ids(tiny.tokenizer, conversations(24))
    assert len({len(x) for x in ids}) > 5  # mixed lengths
    batched, _ = embed_all(tiny, ids, max_tokens=400)
    single = np.stack([embed_all(tiny, [x], max_tokens=400)[0][0] for x in ids])
    assert np.abs(batched - single).max() <= 1e-5


def test_last_token_is_the_true_last_token_when_eos_equals_pad(tiny):
    """Padding with the pad id (== EOS) must not move the pick: compare to the unpadded forward."""
    ids = render_ids(tiny.tokenizer, conversations(6))
    input_ids, mask = pad_right(ids, tiny.tokenizer.pad_token_id)
    with torch.inference_mode():
        hidden = tiny.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        batched = backbone_forward(tiny, input_ids, mask)["embedding"].numpy()
    for i, x in enumerate(ids):
        with torch.inference_mode():
            alone = tiny.model(input_ids=torch.tensor([x])).last_hidden_state[0, -1]
        assert torch.allclose(torch.from_numpy(batched[i]), alone, atol=1e-5)
        # what a pad-id rule would pick instead: the first pad (== EOS) position is not the last token
        first_pad = int((input_ids[i] == tiny.tokenizer.pad_token_id).int().argmax())
        assert first_pad != len(x) - 1
    assert hidden.shape[0] == len(ids)


def test_base_score_equals_the_checkpoints_own_classifier(tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification

    backbone = load_backbone(str(tiny_rm_dir), dtype="float32", device="cpu")
    assert backbone.score_head is not None
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir, dtype=torch.float32).eval()
    # One unpadded sequence at a time; without a pad id the classifier pools the last token. (With
    # pad == EOS it would pool the token *before* the final EOS: the trap docs/method.md section 5 names.)
    reference.config.pad_token_id = None
    ids = render_ids(backbone.tokenizer, conversations(8))
    _, scores = embed_all(backbone, ids, max_tokens=300)
    for x, s in zip(ids, scores):
        with torch.inference_mode():
            expected = reference(input_ids=torch.tensor([x])).logits[0, 0].item()
        assert abs(s - expected) <= 1e-5


# ---------------------------------------------------------------------------------------------- run


RATINGS = "synthetic:ratings?n=30&seed=0"
PREFERENCES = "synthetic:preferences?n=20&seed=1"


def extract_options(model_dir, cache_dir, **kw) -> dict:
    """The tests' extraction settings, as plain values (a child process rebuilds them)."""
    return {**dict(backbone=str(model_dir), cache_dir=str(cache_dir), device="cpu", storage_dtype="float32",
                   part_rows=8, max_tokens_per_batch=2048, max_length=1024), **kw}


def extract_config(model_dir, cache_dir, **kw) -> ExtractConfig:
    datasets = {
        "ratings": DatasetSpec("ratings", "ratings", RATINGS),
        "preferences": DatasetSpec("preferences", "preferences", PREFERENCES),
    }
    return ExtractConfig(**{"datasets": datasets, **extract_options(model_dir, cache_dir, **kw)})


@pytest.mark.integration
def test_run_extract_writes_ratings_and_pairs(tiny_rm_dir, tmp_path, tiny):
    cfg = extract_config(tiny_rm_dir, tmp_path)
    stats = run_extract(cfg)
    assert stats["ratings"].rows == 30 and stats["preferences"].rows == 40
    ratings = read_features(tmp_path / "ratings")
    expected = np.array([r.labels for r in make_ratings(30, 0)], dtype=np.float32)
    assert np.array_equal(ratings.labels.numpy(), expected)
    assert ratings.id.tolist() == [r.id for r in make_ratings(30, 0)]
    assert not torch.isnan(ratings.base_score).any()
    pairs = read_pairs(tmp_path / "preferences")
    assert pairs.chosen.pair_id.tolist() == [p.pair_id for p in make_preferences(20, 1)]
    margins = np.array([p.margin for p in make_preferences(20, 1)], dtype=np.float32)  # carried, not dropped
    assert np.array_equal(pairs.chosen.margin.numpy(), margins) and (margins > 0).all()
    assert np.array_equal(pairs.rejected.margin.numpy(), margins) and np.isnan(ratings.margin.numpy()).all()
    assert (pairs.chosen.role == "chosen").all() and (pairs.rejected.role == "rejected").all()
    manifest = read_manifest(tmp_path / "ratings")
    assert manifest["complete"] and manifest["hidden_size"] == 64
    # running again does nothing: every part is complete
    again = run_extract(cfg)
    assert again["ratings"].parts_written == 0 and again["ratings"].parts_skipped == 4


@pytest.mark.integration
def test_too_long_rows_are_dropped_and_counted_pairs_whole(tiny_dir, tmp_path, tiny):
    pairs = make_preferences(20, 1)
    ids = render_ids(tiny.tokenizer, [c for p in pairs for c in (p.chosen, p.rejected)])
    lengths = np.array([len(x) for x in ids])
    max_length = int(np.median(lengths))
    cfg = extract_config(tiny_dir, tmp_path, max_length=max_length)
    stats = run_extract(cfg, names=["preferences"])["preferences"]
    kept = keep_mask(lengths, max_length, paired=True)
    assert stats.rows == kept.sum() and stats.dropped == (~kept).sum() > 0
    got = read_pairs(tmp_path / "preferences")
    assert (got.chosen.n_tokens <= max_length).all() and (got.rejected.n_tokens <= max_length).all()
    assert read_manifest(tmp_path / "preferences")["dropped_rows"] == (~kept).sum()


@pytest.mark.integration
def test_the_backbone_is_opened_once_per_run(tiny_dir, tmp_path, monkeypatch):
    """Resolving a backbone hashes its weights (a GGUF in full): once a run, for every dataset."""
    import pipeline.features.backbone as B

    calls = []
    real = B.resolve_backbone
    monkeypatch.setattr(B, "resolve_backbone", lambda *a: calls.append(a) or real(*a))
    stats = run_extract(extract_config(tiny_dir, tmp_path))
    assert set(stats) == {"ratings", "preferences"} and stats["ratings"].parts_written == 4
    assert len(calls) == 1


@pytest.mark.integration
def test_a_cache_records_its_compute_dtype_and_refuses_another(tiny_dir, tmp_path):
    """bf16 and fp32 features differ by ~1e-2: a cache made in one is never resumed or reused in the other."""
    from pipeline.cache import CacheError

    run_extract(extract_config(tiny_dir, tmp_path, dtype="float32"), names=["ratings"])
    assert read_manifest(tmp_path / "ratings")["extra"]["compute_dtype"] == "float32"
    with pytest.raises(CacheError, match="compute_dtype"):
        run_extract(extract_config(tiny_dir, tmp_path, dtype="bfloat16"), names=["ratings"])


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_bf16_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, native, expected):
    import pipeline.device as B

    monkeypatch.setattr(B, "native_bf16_cpu", lambda: native)
    assert B.resolve_dtype("auto-bf16", torch.device("cpu")) == expected
    assert B.resolve_dtype("auto-bf16", torch.device("cuda")) == torch.bfloat16
    assert B.resolve_dtype("auto", torch.device("cpu")) == torch.float32  # docs/method.md 5: fp32 on CPU unless asked


SLOW_EMBED = slow_forward(0.15)
KILL_SCRIPT = SLOW_EMBED + """
from pipeline.configs import DatasetSpec, ExtractConfig
from pipeline.recipes.extract import run_extract
run_extract(ExtractConfig(**{config}), names=["ratings"])
"""


def wait_for_a_complete_part(manifest: Path, timeout: float = 600) -> None:
    """Return once the child has recorded at least one complete part in the manifest (a guard against a hang, long
    enough for a loaded machine: the test then says so rather than signalling a child still starting)."""
    deadline = time.time() + timeout
    while not (manifest.exists() and json.loads(manifest.read_text()).get("parts")):
        assert time.time() < deadline, f"no complete part in {manifest} after {timeout:.0f} s"
        time.sleep(0.05)


@pytest.mark.integration
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_dir, tmp_path):
    run_extract(extract_config(tiny_dir, tmp_path / "clean"), names=["ratings"])
    cache = tmp_path / "killed"
    options = extract_options(tiny_dir, cache, datasets={"ratings": DatasetSpec("ratings", "ratings", RATINGS)})
    script = KILL_SCRIPT.format(config=repr(options))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    manifest = cache / "ratings" / "_manifest.json"
    wait_for_a_complete_part(manifest)
    time.sleep(0.2)  # kill mid-way through the next part
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = len(json.loads(manifest.read_text())["parts"])
    assert 0 < done < 4, "the child should have been killed mid-run"
    stats = run_extract(extract_config(tiny_dir, tmp_path / "killed"), names=["ratings"])["ratings"]
    assert stats.parts_skipped == done and stats.parts_written == 4 - done
    a, b = read_features(tmp_path / "clean" / "ratings"), read_features(cache / "ratings")
    assert a.id.tolist() == b.id.tolist()
    assert torch.equal(a.embedding, b.embedding)
    assert np.array_equal(a.labels.numpy(), b.labels.numpy(), equal_nan=True)


# Ctrl-C after the first complete part, never racing the run's end: once the manifest records a part, the next
# forward pass waits (interruptibly) for the test's SIGINT, however fast or loaded the machine is.
CTRL_C_SCRIPT = SLOW_EMBED + """
import json, pathlib
slow = embedding.backbone_forward
def backbone_forward(*a, **k):
    manifest = pathlib.Path({cache!r}) / "ratings" / "_manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("parts"):
        time.sleep(600)
    return slow(*a, **k)
embedding.backbone_forward = backbone_forward
from cli import app
app(["extract", "--backbone", {model!r}, "--cache-dir", {cache!r}, "--device", "cpu", "--dtype", "float32",
     "--part-rows", "8",
     "--source", {ratings!r}, "--kind", "ratings", "--name", "ratings"])
"""


@pytest.mark.integration
def test_ctrl_c_stops_cleanly_and_the_next_run_finishes(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    script = CTRL_C_SCRIPT.format(model=str(tiny_dir), cache=str(cache), ratings=RATINGS)
    # SIGINT as a terminal sends it: a suite started in the background (`cmd &` in a script) hands its children
    # SIGINT ignored, and Python then installs no handler for it, so the child must get the default back
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_a_complete_part(cache / "ratings" / "_manifest.json")
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130, err
    assert "interrupted: complete parts are kept" in err and "Traceback" not in err
    assert not [p for p in (cache / "ratings").iterdir() if p.name.startswith(".")]  # no temp file left
    stats = run_extract(extract_config(tiny_dir, cache, datasets={
        "ratings": DatasetSpec("ratings", "ratings", RATINGS)}), names=["ratings"])
    assert stats["ratings"].parts_skipped >= 1 and stats["ratings"].rows == 30


# ---------------------------------------------------------------------------------------------- hub revisions
# The Hub is unreachable here: its commit lookup (pipeline.data.sources.hub_commit) and datasets.load_dataset
# are replaced by fakes, so an "upstream change" is a new commit the fake resolver answers.


def fake_hub(monkeypatch, commits: dict, loads: list):
    """hub_commit answers ``commits[repo]`` (None: offline); load_dataset serves synthetic HelpSteer2 rows."""
    import types

    from pipeline.data import synthetic

    monkeypatch.setattr("pipeline.data.sources.hub_commit", lambda repo, revision=None: commits.get(repo))

    def load_dataset(repo, split, revision):
        loads.append((repo, split, revision))
        return synthetic.helpsteer2_records(12, seed=0)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_pin_revision_resolves_hub_datasets_only(monkeypatch):
    from pipeline.data import pin_revision
    from pipeline.errors import DataError

    fake_hub(monkeypatch, {"org/data": "c0ffee"}, [])
    assert pin_revision("org/data") == ("org/data@c0ffee", "c0ffee")
    assert pin_revision("org/data", "v1") == ("org/data@c0ffee", "c0ffee")
    assert pin_revision("org/offline@v2") == ("org/offline@v2", None)  # offline: as asked, unchanged
    assert pin_revision("org/offline") == ("org/offline", None)
    assert pin_revision(RATINGS) == (RATINGS, None)
    with pytest.raises(DataError, match="only hub datasets have revisions"):
        pin_revision(RATINGS, "v1")
    with pytest.raises(DataError, match="keep one"):
        pin_revision("org/data@v1", "v2")


@pytest.mark.integration
def test_an_upstream_change_of_a_hub_dataset_gives_a_new_cache_not_a_stale_one(tiny_dir, tmp_path, monkeypatch):
    from pipeline.cache import CacheMismatch
    from pipeline.data import fingerprint

    commits, loads = {"org/helpsteer": "aaa111"}, []
    fake_hub(monkeypatch, commits, loads)
    cfg = ExtractConfig(datasets={"hub": DatasetSpec("hub", "ratings", "org/helpsteer")},
                        **extract_options(tiny_dir, tmp_path))
    assert run_extract(cfg)["hub"].rows == 12
    manifest = read_manifest(tmp_path / "hub")
    assert loads == [("org/helpsteer", "train", "aaa111")]  # read at the commit that was fingerprinted
    assert manifest["extra"]["dataset_revision"] == "aaa111"
    assert manifest["dataset_fingerprint"] == fingerprint("org/helpsteer@aaa111")
    assert run_extract(cfg)["hub"].parts_written == 0  # same commit: the cache is complete, reused
    commits["org/helpsteer"] = "bbb222"  # upstream changed
    with pytest.raises(CacheMismatch, match="extra.dataset_revision: cache has 'aaa111', this run has 'bbb222'"):
        run_extract(cfg)
    stats = run_extract(dataclasses.replace(cfg, overwrite=True))["hub"]
    assert stats.parts_written == 2 and read_manifest(tmp_path / "hub")["extra"]["dataset_revision"] == "bbb222"
    commits.clear()  # offline: the cache identity is what it was before revisions were resolved
    offline = run_extract(ExtractConfig(datasets={"hub2": DatasetSpec("hub2", "ratings", "org/helpsteer")},
                                        **extract_options(tiny_dir, tmp_path)))
    manifest = read_manifest(tmp_path / "hub2")
    assert offline["hub2"].rows == 12 and "dataset_revision" not in manifest["extra"]
    assert manifest["dataset_fingerprint"] == fingerprint("org/helpsteer")
