"""Nothing wrong passes silently: damaged caches are refused (and rebuilt by extract), bad options and presets
stop a command before any model loads, training that diverges saves nothing, a second writer is refused,
and every failure is one line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from fuzz_cli import PRESET_MISTAKES
from pipeline.cache import CacheError, CacheSpec, open_writer

runner = CliRunner()


def one_line_error(result, *needles: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def small_spec(**changes) -> CacheSpec:
    return CacheSpec(**{**dict(backbone="test/tiny", backbone_revision="r", hidden_size=4, storage_dtype="float32",
                                max_length=64, chat_template_hash="t", dataset="d", dataset_fingerprint="f",
                                kind="ratings"), **changes})


# ----------------------------------------------------------------------------------------------
# Options and presets: checked before anything loads


@pytest.mark.parametrize("args, needles", [
    (["train-heads", "--epochs", "0"], ["--epochs must be a whole number, 1 or more, got 0"]),
    (["train-heads", "--lr", "-1"], ["--lr must be a positive finite number"]),
    (["train-heads", "--gate-batch-size", "0"], ["--gate-batch-size"]),
    (["train-heads", "--ensemble", "0"], ["--ensemble"]),
    (["train-heads", "--loss", "nl"], ["--loss must be one of ridge, reparam, nll, beta-nll", "did you mean 'nll'?"]),
    (["train-heads", "--gate", "softmx"], ["did you mean 'softmax'?"]),
    (["train-heads", "--val-fraction", "1.5"], ["--val-fraction must be a fraction"]),
    (["train-heads", "--val-fraction", "0.5", "--calibration-fraction", "0.5"], ["leave no rows to train on"]),
    (["extract", "--max-tokens-per-batch", "0"], ["--max-tokens-per-batch"]),
    (["extract", "--part-rows", "-3"], ["--part-rows"]),
    (["extract", "--max-length", "0"], ["--max-length"]),
    (["extract", "--storage-dtype", "float64"], ["--storage-dtype must be one of float16, float32"]),
    (["extract", "--dtype", "fp8"], ["--dtype must be one of auto, auto-bf16, float32, bfloat16, float16"]),
    (["extract", "--device", "gpu"], ["--device must be auto, cpu, cuda, cuda:N"]),
    (["extract", "--source", "x.jsonl"], ["--source needs --kind"]),
    (["extract", "--source", "x.jsonl", "--kind", "pairs"], ["--kind must be one of ratings, preferences"]),
    (["score", "m", "-i", "x.jsonl", "--max-tokens-per-batch", "0"], ["--max-tokens-per-batch"]),
    (["evaluate", "--baseline-ensemble", "1"], ["--baseline-ensemble must be a whole number, 2 or more"]),
])
def test_bad_option_values_stop_before_anything_loads(args, needles, monkeypatch):
    import pipeline.features.backbone as B

    monkeypatch.setattr(B, "open_backbone", lambda *a, **k: pytest.fail("a model was opened"))
    one_line_error(runner.invoke(app, args), *needles, code=2)


@pytest.mark.parametrize("text, needles", PRESET_MISTAKES)
def test_preset_mistakes_name_the_file_the_key_and_the_nearest_name(tmp_path, text, needles):
    preset = tmp_path / "mine.toml"
    preset.write_text(text)
    one_line_error(runner.invoke(app, ["extract", "-p", str(preset)]), str(preset), *needles, code=2)


def test_a_preset_saved_with_a_byte_order_mark_is_read(tmp_path):
    preset = tmp_path / "bom.toml"
    preset.write_bytes(b"\xef\xbb\xbf" + b'[extract]\nmax_length = "long"\n')  # read: its own mistake is named
    one_line_error(runner.invoke(app, ["extract", "-p", str(preset)]), "max_length must be a whole number", code=2)


# ----------------------------------------------------------------------------------------------
# Damaged caches


def damage(part: Path) -> None:
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x55  # same size, other bytes
    part.write_bytes(bytes(data))


@pytest.mark.integration
def test_a_damaged_part_is_refused_everywhere_and_extract_rebuilds_it(tmp_path):
    from tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "m")
    cache = tmp_path / "cache"
    args = ["--backbone", str(model), "--cache-dir", str(cache), "--device", "cpu", "--part-rows", "8"]
    extract = ["extract", *args, "--source", "synthetic:ratings?n=30&seed=0", "--kind", "ratings", "--name", "ratings"]
    assert runner.invoke(app, extract).exit_code == 0
    prefs = ["extract", *args, "--source", "synthetic:preferences?n=20&seed=1", "--kind", "preferences",
             "--name", "preferences"]
    assert runner.invoke(app, prefs).exit_code == 0
    part = cache / "ratings" / "part-00001.parquet"
    before = part.read_bytes()
    damage(part)
    train = ["train-heads", "--cache-dir", str(cache), "--heads-dir", str(tmp_path / "heads"), "--device", "cpu",
             "--epochs", "2", "--gate-epochs", "1"]
    one_line_error(runner.invoke(app, train), "part-00001.parquet: part has changed since it was written",
                   "rebuilds the damaged parts only")
    assert not (tmp_path / "heads").exists()  # nothing trained, nothing saved
    info = runner.invoke(app, ["cache", "info", str(cache / "ratings")])
    assert info.exit_code == 1 and "DAMAGED: 1 of 4 parts missing or changed (part-00001.parquet" in info.output
    result = runner.invoke(app, extract)  # the resume check finds it and writes that part again
    assert result.exit_code == 0 and "1 parts written, 3 already complete" in result.output
    assert part.read_bytes() == before  # the same features again (a deterministic backbone)
    assert runner.invoke(app, train).exit_code == 0
    (cache / "ratings" / "part-00002.parquet").unlink()  # a missing part: incomplete, and said so
    info = runner.invoke(app, ["cache", "info", str(cache / "ratings")])
    assert "part-00002.parquet is missing" in info.output and "(complete" not in info.output


def test_a_manifest_whose_row_count_disagrees_with_its_parts_is_damaged(tmp_path):
    from pipeline.cache import read_features

    folder = tmp_path / "c"
    with open_writer(folder, small_spec(), n_parts=1) as w:
        w.write_part(0, {"id": ["a", "b"], "source": "s", "n_tokens": np.ones(2, np.int32),
                         "embedding": np.zeros((2, 4), np.float32)})
        w.finish(1)
    assert len(read_features(folder).id) == 2
    manifest = json.loads((folder / "_manifest.json").read_text())
    manifest["rows"] = 3
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="_manifest.json: says 3 rows but its parts hold 2"):
        read_features(folder)
    info = runner.invoke(app, ["cache", "info", str(folder)])
    assert info.exit_code == 1 and "DAMAGED" in info.output and "_manifest.json" in info.output


def test_an_empty_or_all_too_long_dataset_is_an_error_not_an_empty_cache(tmp_path, write_jsonl):
    from tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "m")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["extract", "--backbone", str(model), "--cache-dir", str(tmp_path / "c"), "--device", "cpu",
            "--kind", "ratings"]
    one_line_error(runner.invoke(app, [*base, "--source", str(empty)]), "no rows to extract")
    rows = write_jsonl("r.jsonl", [{"prompt": "hi", "response": "hello there", "helpfulness": 3}])
    one_line_error(runner.invoke(app, [*base, "--source", str(rows), "--max-length", "4", "--name", "r"]),
                   "all 1 rows are longer than max_length=4 tokens: nothing to cache")
    assert not (tmp_path / "c" / "r" / "_manifest.json").exists() or "\"complete\": false" in (
        tmp_path / "c" / "r" / "_manifest.json").read_text()


def test_a_second_writer_is_refused_while_the_first_holds_the_cache(tmp_path):
    first = open_writer(tmp_path / "c", small_spec(), n_parts=1)
    with pytest.raises(CacheError, match="another `urm extract` is writing this cache now"):
        open_writer(tmp_path / "c", small_spec(), n_parts=1)
    first.write_part(0, {"id": ["a"], "source": "s", "n_tokens": np.ones(1, np.int32),
                         "embedding": np.zeros((1, 4), np.float32)})
    first.finish(1)  # releases the lock
    open_writer(tmp_path / "c", small_spec(), n_parts=1).close()
    # another process: the lock is the kernel's, and goes with the process
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from pipeline.cache import CacheSpec, open_writer\n"
        "w = open_writer(%r, CacheSpec(backbone='test/tiny', backbone_revision='r', hidden_size=4, storage_dtype="
        "'float32', max_length=64, chat_template_hash='t', dataset='d', dataset_fingerprint='f', kind='ratings'))\n"
        "print('locked', flush=True); time.sleep(60)") % (str(Path(__file__).parents[1]), str(tmp_path / "c"))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheError, match=rf"another `urm extract` is writing this cache now \(process {holder.pid}\)"):
            open_writer(tmp_path / "c", small_spec())
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    open_writer(tmp_path / "c", small_spec()).close()  # the dead process's lock is gone


# ----------------------------------------------------------------------------------------------
# Training that diverges, damaged heads and exports, unforeseen errors


def test_training_that_diverges_saves_nothing(tmp_path):
    import torch

    from pipeline.configs import ValueHeadConfig, build
    from pipeline.data.testing import linear_ratings
    from pipeline.errors import UserError
    from pipeline.train import fit_value_head

    h, y = linear_ratings(n=400, d=8)
    h = h.float() * 1e30  # features this large make the very first step overflow
    cfg = build(ValueHeadConfig, dict(loss="nll", epochs=3, batch_size=64, device="cpu", lr=10.0))
    with pytest.raises(UserError, match="the value head's training diverged at epoch 1.*Lower --lr"):
        fit_value_head(h, y, cfg)
    assert torch.isfinite(h).all()  # the inputs were finite: the run itself diverged


def test_damaged_heads_and_exports_are_one_line(tmp_path):
    from tiny_models import export_tiny

    bb, heads, out = export_tiny(tmp_path)
    export_again = ["export", "--backbone", str(bb), "--heads-dir", str(heads), "--out-dir", str(tmp_path / "again")]
    tensors = (heads / "heads.safetensors").read_bytes()
    flipped = bytearray(tensors)
    flipped[-3] ^= 0x10  # one bit of one weight: still a valid file, so only the checksum can tell
    (heads / "heads.safetensors").write_bytes(bytes(flipped))
    one_line_error(runner.invoke(app, export_again), "heads.safetensors has changed since it was saved")
    meta = json.loads((heads / "heads.json").read_text())
    del meta["checksum"]  # heads saved before checksums: a truncated file is still named
    (heads / "heads.json").write_text(json.dumps(meta))
    (heads / "heads.safetensors").write_bytes(tensors[:100])
    one_line_error(runner.invoke(app, export_again), "heads.safetensors: not a readable safetensors file")
    (heads / "heads.json").write_text("{\"format_version\": 1, \"attributes\": [")
    one_line_error(runner.invoke(app, ["export", "--heads-dir", str(heads), "--out-dir", str(tmp_path / "again")]),
                   "heads.json: unreadable")
    convs = tmp_path / "c.jsonl"
    convs.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    shard = out / "urm-heads.safetensors"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-8] + bytes(8))
    one_line_error(runner.invoke(app, ["score", str(out), "-i", str(convs)]),
                   "urm-heads.safetensors has changed since it was saved", "re-export")
    one_line_error(runner.invoke(app, ["evaluate", str(out), "--no-baselines"]),
                   "urm-heads.safetensors has changed since it was saved")
    shard.write_bytes(intact)
    shard = out / "model-backbone.safetensors"
    os.unlink(shard)  # it was a hardlink of the backbone's file: damage a copy in its place
    weights = bytearray((bb / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0x01  # one bit of one backbone weight: a valid file, wrong numbers
    shard.write_bytes(bytes(weights))
    one_line_error(runner.invoke(app, ["score", str(out), "-i", str(convs)]),
                   "model-backbone.safetensors has changed since it was exported", "--no-verify")
    shard.write_bytes(bytes(weights[:1000]))  # truncated: with --no-verify the load itself fails, still one line
    one_line_error(runner.invoke(app, ["score", str(out), "-i", str(convs), "--no-verify"]),
                   "cannot be loaded", "export it again")
    shard.unlink()
    one_line_error(runner.invoke(app, ["score", str(out), "-i", str(convs), "--no-verify"]),
                   "model-backbone.safetensors is missing")


def test_an_unforeseen_error_is_one_line_unless_debug(monkeypatch, tmp_path):
    import pipeline.recipes.cache_info as recipe

    def broken(*args, **kwargs):
        raise RuntimeError("something no check foresaw\nsecond line")

    monkeypatch.setattr(recipe, "cache_info", broken)
    one_line_error(runner.invoke(app, ["cache", "info", str(tmp_path)]), "unexpected RuntimeError: something no check",
                   "--debug or URM_DEBUG=1 shows the traceback")
    result = runner.invoke(app, ["--debug", "cache", "info", str(tmp_path)])
    assert isinstance(result.exception, RuntimeError)  # with --debug the exception (and its traceback) goes through
    monkeypatch.delenv("URM_DEBUG", raising=False)


def test_a_missing_local_path_is_a_missing_file_not_a_hub_id(tmp_path, monkeypatch):
    from pipeline.data import source_kind

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert source_kind("data/pairs") == "file" and source_kind("org/name") == "hub"
    one_line_error(runner.invoke(app, ["extract", "--source", "data/pairs", "--kind", "preferences"]),
                   "data/pairs: file not found")


# ----------------------------------------------------------------------------------------------
# Data without signal, caches of the wrong kind, heads of another width


@pytest.mark.integration
def test_data_without_signal_is_refused_at_extract_in_one_line(tmp_path, write_jsonl):
    from tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "m")
    base = ["extract", "--backbone", str(model), "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    turn = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    same = write_jsonl("same.jsonl", [{"chosen": turn, "rejected": turn}] * 3)
    one_line_error(runner.invoke(app, [*base, "--source", str(same), "--kind", "preferences"]),
                   "same.jsonl: all 3 pairs have chosen identical to rejected: they carry no preference")
    unrated = write_jsonl("unrated.jsonl", [{"prompt": "hi", "response": "yo", "helpfulness": None}] * 4)
    one_line_error(runner.invoke(app, [*base, "--source", str(unrated), "--kind", "ratings"]),
                   "unrated.jsonl: none of the 4 rows has a rating")
    assert not (tmp_path / "c").exists()  # refused before any cache folder is made
    other = [turn[0], {"role": "assistant", "content": "5"}]
    mixed = write_jsonl("mixed.jsonl", [{"chosen": turn, "rejected": turn}, {"chosen": turn, "rejected": other}])
    result = runner.invoke(app, [*base, "--source", str(mixed), "--kind", "preferences"])
    assert result.exit_code == 0 and "warning: 1 of 2 pairs dropped: their chosen is identical" in result.output
    manifest = json.loads((tmp_path / "c" / "mixed" / "_manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["extra"]["identical_pairs_dropped"] == 1  # one pair, both sides


def test_a_cache_of_the_wrong_kind_is_refused_by_every_option_that_names_one(tmp_path):
    from tiny_models import export_tiny

    _, heads, _ = export_tiny(tmp_path)
    ratings, prefs = tmp_path / "ratings", tmp_path / "prefs"
    for folder, kind in ((ratings, "ratings"), (prefs, "preferences")):
        pairs = {"pair_id": ["p0", "p0"], "role": ["chosen", "rejected"]} if kind == "preferences" else {}
        with open_writer(folder, small_spec(kind=kind), n_parts=1) as w:
            w.write_part(0, {"id": ["a", "b"], "source": "s", "n_tokens": np.ones(2, np.int32),
                             "embedding": np.eye(2, 4, dtype=np.float32), "labels": np.ones((2, 5), np.float32),
                             **pairs})
            w.finish(1)
    evaluate = ["evaluate", str(heads), "--report-dir", str(tmp_path / "eval"), "--device", "cpu"]
    right = ["--eval-preferences", str(prefs), "--eval-ratings", str(ratings)]  # the others, of the right kinds

    def evaluate_with(option, cache):
        given = right if option not in right else right[:right.index(option)] + right[right.index(option) + 2:]
        return [*evaluate, *given, option, str(cache)]

    cases = [
        (evaluate_with("--eval-ratings", prefs), "--eval-ratings", "preferences"),
        (evaluate_with("--eval-preferences", ratings), "--eval-preferences", "ratings"),
        (evaluate_with("--shift-ratings", prefs), "--shift-ratings", "preferences"),
        (evaluate_with("--train-ratings-cache", prefs), "--train-ratings-cache", "preferences"),
        (evaluate_with("--train-preferences-cache", ratings), "--train-preferences-cache", "ratings"),
        (["train-value-head", "--ratings-cache", str(prefs), "--heads-dir", str(tmp_path / "h")], "--ratings-cache",
         "preferences"),
        (["train-gating", "--preferences-cache", str(ratings), "--heads-dir", str(heads)], "--preferences-cache",
         "ratings"),
        (["train-heads", "--ratings-cache", str(ratings), "--preferences-cache", str(ratings), "--heads-dir",
          str(tmp_path / "h")], "--preferences-cache", "ratings"),
    ]
    for argv, option, kind in cases:
        wrong = argv[argv.index(option) + 1]
        one_line_error(runner.invoke(app, argv), f"{option} {wrong}: a {kind} cache, but {option} takes a")
        missing = argv[:argv.index(option) + 1] + ["nope/shift"] + argv[argv.index(option) + 2:]
        one_line_error(runner.invoke(app, missing), f"{option} nope/shift: no such cache")  # as typed, the option's
    assert not (tmp_path / "eval").exists() and not (tmp_path / "h").exists()


def test_heads_of_another_width_in_an_export_are_urms_one_line_even_unverified(tmp_path):
    import shutil

    from tiny_models import export_tiny, random_heads_dir

    bb, _, out = export_tiny(tmp_path)
    other = random_heads_dir(tmp_path / "h32", bb, d=32)  # heads fitted on a 32-wide backbone's features
    shutil.copyfile(other / "heads.json", out / "heads.json")
    shutil.copyfile(other / "heads.safetensors", out / "urm-heads.safetensors")
    convs = tmp_path / "c.jsonl"
    convs.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    one_line_error(runner.invoke(app, ["score", str(out), "-i", str(convs), "--no-verify"]),
                   "heads.json: the heads take features of hidden size 32, but the backbone in",
                   "has hidden size 64")
