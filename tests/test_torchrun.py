"""Extraction under torchrun: the part shares, the ranks' journals, and real 2-rank gloo runs on this CPU
(equal to a single process; a rank killed mid-run, then finished by a single process)."""

from __future__ import annotations

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

from pipeline.cache import journal_name, open_rank_writer, open_writer, read_features, read_manifest
from pipeline.configs import DatasetSpec, ExtractConfig
from pipeline.features import RankError, Ranks, balance_parts, rank_device, ranks_from_env
from pipeline.recipes.extract import run_extract
from test_cache import make_part, make_spec
from tiny_models import build_tiny_llama, slow_forward

ROOT = Path(__file__).resolve().parents[1]
RATINGS = "synthetic:ratings?n=30&seed=0"
PREFERENCES = "synthetic:preferences?n=20&seed=1"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


# ---------------------------------------------------------------------------------------------- pure


def test_balance_parts_is_disjoint_complete_and_balanced():
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 5000, 37).tolist()
    for world in (1, 2, 3, 8):
        shares = balance_parts(tokens, world)
        flat = sorted(i for s in shares for i in s)
        assert flat == list(range(len(tokens)))  # every part once, no part twice
        loads = [sum(tokens[i] for i in s) for s in shares]
        assert max(loads) <= sum(tokens) / world + max(tokens)  # longest-first's bound
        assert shares == balance_parts(list(tokens), world)  # a pure function: ranks agree without talking
    # longest first: 9 and 8 go to ranks 0 and 1, then each next part to the lighter rank
    assert balance_parts([1, 9, 2, 8, 3], 2) == [[0, 1, 2], [3, 4]]
    assert balance_parts([5, 5], 3) == [[0], [1], []]  # more ranks than parts: some have none
    assert balance_parts([], 2) == [[], []]


def test_balance_parts_beats_contiguous_blocks_on_skewed_lengths():
    tokens = [8000] * 4 + [500] * 12  # long conversations first, as in a sorted dataset
    loads = [sum(tokens[i] for i in s) for s in balance_parts(tokens, 4)]
    assert max(loads) == 9500 and min(loads) == 9500  # blocks of 4 parts would give 32000 vs 2000


def test_ranks_from_env():
    assert ranks_from_env({}) == Ranks() and not Ranks().distributed
    r = ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (r.rank, r.world_size, r.local_rank, r.distributed, r.is_main) == (3, 4, 1, True, False)
    assert not ranks_from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}).distributed
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(RankError, match="torchrun sets them"):
            ranks_from_env(bad)


def test_rank_device():
    two = Ranks(1, 2, 1)
    assert rank_device("cuda:1", Ranks()) == "cuda:1"  # a single process keeps what it was given
    assert rank_device("cpu", two) == "cpu"
    if not torch.cuda.is_available():
        assert rank_device("auto", two) == "cpu"
    with pytest.raises(RankError, match="each rank takes cuda:LOCAL_RANK"):
        rank_device("cuda:0", two)


# ---------------------------------------------------------------------------------------------- journals


def test_journals_of_a_killed_run_count_as_done_with_any_world_size(tmp_path):
    """Rank 0 opens the cache, two ranks write parts through their journals and die before the merge; a single
    writer then folds the journals in (their parts are done), drops what no journal lists, and finishes."""
    spec = make_spec()
    owner = open_writer(tmp_path, spec, n_parts=5)
    writers = [open_rank_writer(tmp_path, spec, owner.manifest, r) for r in (0, 1)]
    writers[0].write_part(0, make_part(0))
    writers[1].write_part(3, make_part(3))
    writers[1].write_part(1, make_part(1))
    journal = json.loads((tmp_path / journal_name(1)).read_text())
    assert [p["index"] for p in journal["parts"]] == [1, 3] and journal["pid"] == os.getpid()
    assert read_manifest(tmp_path)["parts"] == []  # ranks never write the manifest
    (tmp_path / "part-00004.parquet").write_bytes(b"written, then killed before its journal")
    owner.close()  # killed: no merge

    again = open_writer(tmp_path, spec, n_parts=5)
    assert again.done_parts == {0, 1, 3}
    assert not list(tmp_path.glob("_parts.*")) and not (tmp_path / "part-00004.parquet").exists()
    assert [p["index"] for p in read_manifest(tmp_path)["parts"]] == [0, 1, 3]
    for i in (2, 4):
        again.write_part(i, make_part(i))
    again.finish(5)
    f = read_features(tmp_path)
    assert f.id.tolist() == [f"p{i}-{j}" for i in range(5) for j in range(60)]  # no row twice, none missing


def test_merge_journals_and_journals_for_other_settings(tmp_path):
    spec = make_spec()
    owner = open_writer(tmp_path, spec, n_parts=2)
    for r in (0, 1):
        open_rank_writer(tmp_path, spec, owner.manifest, r).write_part(r, make_part(r))
    owner.merge_journals()
    assert owner.done_parts == {0, 1} and not list(tmp_path.glob("_parts.*"))
    owner.finish(2)
    assert read_manifest(tmp_path)["complete"] and read_manifest(tmp_path)["rows"] == 120

    other = tmp_path / "other"  # a journal written for other settings (another part count) is not trusted
    owner = open_writer(other, spec, n_parts=2)
    manifest = {**owner.manifest, "n_parts": 3}
    open_rank_writer(other, spec, manifest, 1).write_part(1, make_part(1))
    owner.close()
    again = open_writer(other, spec, n_parts=2)
    assert again.done_parts == set() and not (other / "part-00001.parquet").exists()
    again.close()


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def options(model_dir, cache_dir) -> dict:
    return dict(backbone=str(model_dir), cache_dir=str(cache_dir), device="cpu", storage_dtype="float32",
                part_rows=4, max_tokens_per_batch=2048, max_length=1024)


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory):
    """The caches a single process makes (the reference)."""
    cache = tmp_path_factory.mktemp("single")
    datasets = {"ratings": DatasetSpec("ratings", "ratings", RATINGS),
                "preferences": DatasetSpec("preferences", "preferences", PREFERENCES)}
    one_thread(run_extract, ExtractConfig(datasets=datasets, **options(tiny_dir, cache)))
    return cache


def one_thread(fn, *args, **kwargs):
    """``fn`` with one torch thread, as torchrun's ranks run (tiny matmuls on a busy 2-core machine run faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def assert_same_cache(a: Path, b: Path) -> None:
    fa, fb = read_features(a), read_features(b)
    assert fa.id.tolist() == fb.id.tolist() and len(set(fb.id.tolist())) == len(fb.id)
    # each part is embedded on its own in both runs, so even the batches are the same; the documented
    # tolerance of batched against one-at-a-time extraction is 1e-5
    torch.testing.assert_close(fa.embedding, fb.embedding, atol=1e-5, rtol=0)
    assert np.array_equal(fa.labels.numpy(), fb.labels.numpy(), equal_nan=True)
    assert fa.role.tolist() == fb.role.tolist() and fa.pair_id.tolist() == fb.pair_id.tolist()


def torchrun(args: list[str], tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(TORCHRUN + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.integration
def test_two_ranks_make_the_cache_one_process_makes(tiny_dir, single, tmp_path):
    preset = tmp_path / "tiny.toml"
    preset.write_text(f'backbone = "{tiny_dir}"\n'
                      f'[datasets.ratings]\nkind = "ratings"\nsource = "{RATINGS}"\n'
                      f'[datasets.preferences]\nkind = "preferences"\nsource = "{PREFERENCES}"\n')
    cache = tmp_path / "cache"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options(tiny_dir, cache).items() if k != "backbone"]
    done = torchrun(["-m", "cli", "extract", "--preset", str(preset), *flags], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("ratings: 30 rows cached") == 1  # rank 0 alone sums up, for all ranks
    assert "(8 parts written, 0 already complete)" in done.stdout
    for name in ("ratings", "preferences"):
        assert_same_cache(single / name, cache / name)
        a, b = read_manifest(single / name), read_manifest(cache / name)
        assert b["complete"] and a["fingerprint"] == b["fingerprint"]  # the same part files, bit for bit
        assert not [f.name for f in (cache / name).iterdir() if f.name.startswith((".", "_parts"))]

    # rank 0 finds other settings: every rank stops with one line (torchrun then prints its own report), rank 1's
    # even when it is 3 s slower than rank 0 to leave (as on a loaded machine): torchrun stops every rank with
    # SIGTERM 0.1 s after one exits, which once cut rank 1 off before it had said why
    script = tmp_path / "slow_rank_1.py"
    script.write_text(SLOW_RANK_1.format(argv=["urm", "extract", "--preset", str(preset), *flags, "--max-length=512",
                                               "ratings"]))
    done = torchrun([str(script)], tmp_path)
    assert done.returncode != 0
    lines = sorted(line for line in done.stderr.splitlines() if line.startswith("error: "))  # either order
    assert len(lines) == 2 and "holds features made with other settings" in lines[0], done.stderr[-3000:]
    assert lines[1] == "error: rank 1 of 2: stopped because rank 0 failed (its error line says why)"
    assert "terminate called" not in done.stderr  # the gloo group ends before the interpreter does
    assert read_manifest(cache / "ratings")["complete"]


SLOW_RANK_1 = """
import sys, time
import pipeline.features.distributed as distributed

leave = distributed.stop


def slowly(ranks):
    leave(ranks)
    if ranks.rank == 1:
        time.sleep(3)


distributed.stop = slowly
sys.argv = {argv!r}
from cli import app
app()
"""


KILL_SCRIPT = slow_forward(0.3) + """
from pipeline.configs import DatasetSpec, ExtractConfig
from pipeline.recipes.extract import run_extract
run_extract(ExtractConfig(**{config}), names=["ratings"])
"""


def journal_parts(path: Path) -> tuple[int | None, int]:
    """(pid, parts listed) of a rank's journal; (None, 0) before its first part."""
    try:
        journal = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None, 0
    return journal["pid"], len(journal["parts"])


@pytest.mark.integration
def test_a_rank_killed_mid_run_then_one_process_finishes_the_cache(tiny_dir, single, tmp_path):
    cache = tmp_path / "cache"
    config = {**options(tiny_dir, cache), "datasets": {"ratings": DatasetSpec("ratings", "ratings", RATINGS)}}
    script = tmp_path / "extract_slowly.py"
    script.write_text(KILL_SCRIPT.format(config=repr(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.Popen(TORCHRUN + [str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    journal = cache / "ratings" / journal_name(1)
    deadline = time.time() + 90
    while time.time() < deadline and journal_parts(journal)[1] < 1 and run.poll() is None:
        time.sleep(0.05)
    pid, written = journal_parts(journal)
    assert written >= 1, "rank 1 should have written a part"
    os.kill(pid, signal.SIGKILL)  # rank 1, mid-way through its next part
    out, _ = run.communicate(timeout=60)
    assert run.returncode != 0, out
    manifest = read_manifest(cache / "ratings")
    assert not manifest["complete"] and manifest["parts"] == []  # rank 0 never merged
    listed = sum(journal_parts(f)[1] for f in (cache / "ratings").glob("_parts.rank-*.json"))
    assert 1 <= listed < 8

    stats = one_thread(run_extract, ExtractConfig(**config), names=["ratings"])["ratings"]  # world size 1 now
    assert stats.parts_skipped == listed and stats.parts_written == 8 - listed and stats.rows == 30
    assert_same_cache(single / "ratings", cache / "ratings")
    assert not [f.name for f in (cache / "ratings").iterdir() if f.name.startswith((".", "_parts"))]
