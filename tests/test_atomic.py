"""Atomic writes: one temporary-name rule, and folders that are replaced whole, never half, never missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.atomic as A
from pipeline.cache.parts import remove_stale_temps


def dead_pid() -> int:
    """The pid of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def folder_with(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "marker.txt").write_text(text)
    return path


def test_the_temp_name_rule_is_one_rule_for_files_folders_and_the_cache(tmp_path):
    pid = dead_pid()
    name = A.temp_path(tmp_path / "part-00003.parquet").name
    assert A.parse_temp(name) == ("part-00003.parquet", os.getpid(), "tmp")
    assert A.parse_temp(f".model.{pid}.old") == ("model", pid, "old")
    # the cache's clean-up reads the same names: a dead writer's temp goes, a live one's and a stranger's stay
    stale = tmp_path / f".part-00003.parquet.{pid}.tmp"
    live = tmp_path / f".part-00004.parquet.{os.getppid()}.tmp"
    foreign = tmp_path / f".notes.txt.{pid}.tmp"
    for f in (stale, live, foreign):
        f.write_bytes(b"x")
    remove_stale_temps(tmp_path)
    assert not stale.exists() and live.exists() and foreign.exists()


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "heads.json"
    A.write_text(target, "old")

    def broken(tmp: Path):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        A.atomic_write(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["heads.json"]


def test_atomic_directory_replaces_a_folder_whole(tmp_path):
    out = folder_with(tmp_path / "model", "old")
    with A.atomic_directory(out) as tmp:
        assert A.parse_temp(tmp.name) == ("model", os.getpid(), "tmp")
        (tmp / "marker.txt").write_text("new")
    assert (out / "marker.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(RuntimeError), A.atomic_directory(out) as tmp:
        (tmp / "marker.txt").write_text("never")
        raise RuntimeError("failed halfway")
    assert (out / "marker.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_directory_never_replaces_a_file(tmp_path):
    """A folder output given the path of the user's file (or a link to one) is refused, the file left as it was."""
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(mine)
    for out in (mine, link):
        with pytest.raises(A.WriteError, match=f"cannot write {out}: a file stands there"), A.atomic_directory(out):
            pass
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["link", "notes.txt"]


def test_the_swap_never_leaves_the_target_missing(tmp_path, monkeypatch):
    """Where the system swaps two folders in one step the two-rename fallback is never taken."""
    a, b = folder_with(tmp_path / "a", "a"), folder_with(tmp_path / "b", "b")
    if not A.exchange(a, b):
        pytest.skip("this file system cannot swap two folders in one step (renameat2 RENAME_EXCHANGE)")
    assert (a / "marker.txt").read_text() == "b" and (b / "marker.txt").read_text() == "a"
    out = folder_with(tmp_path / "model", "old")
    monkeypatch.setattr(A, "_replace_in_two_renames", lambda *a: pytest.fail("the target would be missing"))
    with A.atomic_directory(out) as tmp:
        (tmp / "marker.txt").write_text("new")
    assert (out / "marker.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "model"]


def test_a_killed_replace_is_cleaned_up_by_the_next_run(tmp_path):
    """Leftovers of a writer that died: its temporary folder goes; killed between the fallback's two renames,
    the old folder comes back from its .old name."""
    pid = dead_pid()
    parent = tmp_path / "runs"
    folder_with(parent / f".model.{pid}.tmp", "half-built")
    folder_with(parent / f".model.{pid}.old", "previous")  # out was moved aside, the new one never arrived
    A.recover_directory(parent / "model")
    assert (parent / "model" / "marker.txt").read_text() == "previous"
    assert sorted(p.name for p in parent.iterdir()) == ["model"]
    folder_with(parent / f".model.{pid}.old", "older")  # killed after the swap: out is there, .old is stale
    with A.atomic_directory(parent / "model") as tmp:
        (tmp / "marker.txt").write_text("new")
    assert (parent / "model" / "marker.txt").read_text() == "new"
    assert sorted(p.name for p in parent.iterdir()) == ["model"]


def test_the_two_rename_fallback_puts_the_old_folder_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    out = folder_with(tmp_path / "model", "old")
    monkeypatch.setattr(A, "exchange", lambda a, b: False)
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(A.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk full"), A.atomic_directory(out) as tmp:
        (tmp / "marker.txt").write_text("new")
    assert (out / "marker.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
