"""The heads folder is written whole or not at all, by one writer at a time (pipeline.model.heads_io).

A save is killed (SIGKILL, in a forked child) before each of its file-system steps in turn, and every
time the folder loads as the old heads or the new ones; a second writer, in another process, is refused
at once with the holder's pid, before anything loads; a full disk during a save leaves the old heads and
names the heads folder.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import heads_meta

import pipeline.atomic as A
from pipeline.model import (CacheIdentity, Heads, HeadsError, heads_writer, load_heads, meta_file, read_meta,
                            save_heads)

ROOT = Path(__file__).resolve().parents[1]
OTHER = "notes.txt"  # a file of the user's in the heads folder: no save touches it


def two_heads() -> tuple[tuple[Heads, object], tuple[Heads, object]]:
    """(old heads, their meta), (new heads, their meta): different weights and a different stage record."""
    torch.manual_seed(0)
    old = Heads(8, 5, members=2, gate="urm", gate_hidden=6)
    new = Heads(8, 5, members=2, gate="urm", gate_hidden=6)
    old_meta, new_meta = heads_meta(old, CacheIdentity("cache/old")), heads_meta(new, CacheIdentity("cache/new"))
    return (old, old_meta), (new, new_meta)


def same_weights(a: Heads, b: Heads) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def save_killed_at(step: int, folder: Path, heads: Heads, meta) -> bool:
    """Save in a forked child killed just before its ``step``-th file-system step (an fsync or a rename, counted
    from 0); True when the kill came, False when the save finished with fewer steps."""
    pid = os.fork()
    if pid == 0:  # the child: count the steps, die at the chosen one
        try:
            steps = [0]
            real_fsync, real_replace = A._fsync, os.replace

            def before(real):
                def wrapped(*args, **kwargs):
                    if steps[0] == step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    steps[0] += 1
                    return real(*args, **kwargs)
                return wrapped

            A._fsync, os.replace = before(real_fsync), before(real_replace)
            save_heads(folder, heads, meta)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_save_killed_at_any_step_leaves_the_old_heads_or_the_new(tmp_path):
    (old, old_meta), (new, new_meta) = two_heads()
    outcomes, step = [], 0
    while True:
        folder = tmp_path / f"step{step}"
        save_heads(folder, old, old_meta)
        (folder / OTHER).write_text("mine")
        killed = save_killed_at(step, folder, new, new_meta)
        loaded, meta = load_heads(folder)  # the last complete pair, whatever the kill left
        is_old, is_new = same_weights(loaded, old), same_weights(loaded, new)
        assert is_old != is_new, f"step {step}: neither the old heads nor the new"
        assert meta.value_head.cache.path == ("cache/old" if is_old else "cache/new"), f"step {step}: a mixed pair"
        assert (folder / OTHER).read_text() == "mine"
        if not killed:
            break
        outcomes.append("old" if is_old else "new")
        # the next writer settles what the kill left: heads.json in place, no temporary file
        with heads_writer(folder):
            pass
        assert sorted(p.name for p in folder.iterdir()) == sorted(["heads.json", "heads.safetensors", OTHER])
        again, meta_again = load_heads(folder)
        assert same_weights(again, loaded) and meta_again == meta
        step += 1
    assert step >= 4, f"a save of {step} steps: its fsyncs and renames were not all counted"
    # killed before the tensors' rename: old; after it: new (a pending heads.json is taken)
    assert "old" in outcomes and "new" in outcomes and outcomes == sorted(outcomes, key=["old", "new"].index)


def test_a_killed_first_save_is_new_heads_or_none(tmp_path):
    _, (new, new_meta) = two_heads()
    for step in range(10):
        folder = tmp_path / f"step{step}"
        if not save_killed_at(step, folder, new, new_meta):
            break
        try:
            loaded, _ = load_heads(folder)
        except HeadsError as e:
            assert "no trained heads here" in str(e)
        else:
            assert same_weights(loaded, new)


def test_readers_take_the_pending_pair_and_ignore_other_leftovers(tmp_path):
    (old, old_meta), (new, new_meta) = two_heads()
    save_heads(tmp_path, old, old_meta)
    # a half-written heads.json of a dead writer and a stray tensors temp: ignored by readers
    (tmp_path / ".heads.json.999999999.tmp").write_text('{"checksum": ')
    (tmp_path / ".heads.safetensors.999999999.tmp").write_bytes(b"\0" * 10)
    assert meta_file(tmp_path) == tmp_path / "heads.json"
    assert same_weights(load_heads(tmp_path)[0], old)
    save_heads(tmp_path, new, new_meta)  # the next save removes them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json", "heads.safetensors"]
    assert read_meta(tmp_path).value_head.cache.path == "cache/new"


def hold_in_another_process(*folders: Path) -> subprocess.Popen:
    """A process holding these heads folders (as a training does) until killed."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import contextlib, sys, time; sys.path.insert(0, %r)\n"
        "from pipeline.model import heads_writer\n"
        "with contextlib.ExitStack() as stack:\n"
        "    for folder in %r: stack.enter_context(heads_writer(folder))\n"
        "    print('locked', flush=True); time.sleep(120)") % (str(ROOT), [str(f) for f in folders])],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.integration
def test_a_second_writer_is_refused_at_once_with_the_holders_pid(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli import app
    from pipeline.configs import GatingConfig, ValueHeadConfig, build
    from pipeline.recipes.demo import run_demo
    from pipeline.recipes.train import train_gating, train_heads, train_value_head

    (old, old_meta), (new, new_meta) = two_heads()
    folder = tmp_path / "heads"
    save_heads(folder, old, old_meta)
    with heads_writer(folder):  # re-entrant within a process: a recipe holding it may save
        save_heads(folder, new, new_meta)
    monkeypatch.chdir(tmp_path)  # the demo preset's heads folder: runs/demo/heads here
    demo_heads = tmp_path / "runs" / "demo" / "heads"
    demo_heads.mkdir(parents=True)
    holder = hold_in_another_process(folder, demo_heads)
    try:
        busy = rf"another training is writing these heads now \(process {holder.pid}\)"
        with pytest.raises(HeadsError, match=busy):
            save_heads(folder, old, old_meta)
        # every training command is refused before it reads anything: the caches named here do not exist
        value = build(ValueHeadConfig, {"heads_dir": str(folder), "cache_dir": str(tmp_path / "none"), "device": "cpu"})
        gating = build(GatingConfig, {"heads_dir": str(folder), "cache_dir": str(tmp_path / "none"), "device": "cpu"})
        for train in (lambda: train_value_head(value), lambda: train_gating(gating), lambda: train_heads(value, gating)):
            t0 = time.perf_counter()
            with pytest.raises(HeadsError, match=busy):
                train()
            assert time.perf_counter() - t0 < 5  # at once, not after a wait
        with pytest.raises(HeadsError, match=rf"process {holder.pid}"):
            run_demo("demo")
        assert not (tmp_path / "cache").exists()  # the demo stopped before extracting anything
        result = CliRunner().invoke(app, ["train-heads", "--heads-dir", str(folder), "--cache-dir", "none",
                                          "--device", "cpu"])
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 1 and len(errors) == 1 and f"process {holder.pid}" in errors[0], result.output
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    save_heads(folder, old, old_meta)  # the lock went with the process
    assert same_weights(load_heads(folder)[0], old)


def test_a_full_disk_during_a_save_keeps_the_old_heads_and_names_the_folder(tmp_path, monkeypatch):
    (old, old_meta), (new, new_meta) = two_heads()
    save_heads(tmp_path, old, old_meta)
    real_write = Path.write_bytes

    def full(self, data):  # what the kernel answers when the disk is full
        if self.name.startswith(".heads.safetensors."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(A.WriteError, match=rf"cannot write {tmp_path}/heads.safetensors: no space left on the device"):
        save_heads(tmp_path, new, new_meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json", "heads.safetensors"]
    assert same_weights(load_heads(tmp_path)[0], old)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_named_by_the_users_path_whoever_writes(tmp_path, monkeypatch):
    """The real ENOSPC of /dev/full, through Python's, pyarrow's and safetensors' writers alike."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    real = A.temp_path

    def onto_full_disk(path, kind="tmp"):
        tmp = real(path, kind)
        tmp.unlink(missing_ok=True)
        tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(A, "temp_path", onto_full_disk)
    table = pa.table({"a": list(range(50_000))})
    writers = {"out.jsonl": lambda tmp: tmp.write_text("x" * 100_000),
               "part.parquet": lambda tmp: pq.write_table(table, str(tmp))}
    for name, write in writers.items():
        with pytest.raises(A.WriteError, match=rf"cannot write {tmp_path / name}: no space left on the device"):
            A.atomic_write(tmp_path / name, write)
        assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary name


def test_an_output_that_is_a_folder_is_named(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(A.WriteError, match=rf"cannot write {tmp_path / 'out'}: it is a folder"):
        A.write_text(tmp_path / "out", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
