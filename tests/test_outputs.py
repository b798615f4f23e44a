"""The one output rule (pipeline.outputs) and what it keeps safe: an output never replaces an input of its run, nor
what the user has there (unless --overwrite), never goes to `.`, a device, a system file system or a place that cannot
be written; each refusal is one line naming the option and the path as typed. Then the commands that write, on a tiny
export: `urm score F -o F`, `urm curate MODEL -i DIR/p.jsonl --out-dir DIR`, evaluate's report folder written as a whole,
an export taken while a training holds the heads, a full stdout."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.outputs import FILE, FOLDER, PARTS, OutputRefused, OwnFiles, check_output

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# The rule (fast)


def test_an_input_is_never_an_output_not_even_with_overwrite(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    source = data / "p.jsonl"
    source.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    inputs = [("--input", source), ("MODEL_DIR", model)]
    for out, shape, says in ((source, FILE, "it is --input"), (data, FOLDER, "it holds --input"),
                             (model / "scores.jsonl", FILE, "it is inside MODEL_DIR"),
                             (model, FOLDER, "it is MODEL_DIR"), (model / "x", PARTS, "it is inside MODEL_DIR")):
        for overwrite in (False, True):
            with pytest.raises(OutputRefused, match=f"^-o {out}: {says} ") as e:
                check_output(out, "-o", shape, inputs=inputs, overwrite=overwrite)
            assert "an input of this run" in str(e.value) and "\n" not in str(e.value)
    check_output(data / "scores.jsonl", "-o", FILE, inputs=inputs)  # beside the input is fine
    check_output(data, "--cache-dir", PARTS, inputs=inputs)  # a folder the command adds its files to may hold it


def test_odd_targets_are_refused_naming_the_option(tmp_path, monkeypatch):
    device = tmp_path / "null.jsonl"
    device.symlink_to(os.devnull)  # a link to a device: refused, and the device is never touched
    with pytest.raises(OutputRefused, match=f"^-o {device}: a device, pipe or socket stands there"):
        check_output(device, "-o", FILE)
    if Path("/proc/self/mounts").is_file():
        with pytest.raises(OutputRefused, match="^-o /proc/x.jsonl: it is on the system's proc file system"):
            check_output("/proc/x.jsonl", "-o", FILE)
    monkeypatch.chdir(tmp_path)
    for here in (".", "./", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(OutputRefused, match="the folder this command runs in"):
            check_output(here, "--report-dir", FOLDER)
    assert check_output(".", "--cache-dir", PARTS) == Path(".")  # adding a cache folder here is fine
    with pytest.raises(OutputRefused, match="^-o : |^-o is empty"):
        check_output("", "-o", FILE)
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    with pytest.raises(OutputRefused, match=f"^--heads-dir {blocker / 'h'}: a file stands where a folder"):
        check_output(blocker / "h", "--heads-dir", PARTS)
    with pytest.raises(OutputRefused, match="it is a folder"):
        check_output(tmp_path, "-o", FILE)
    assert blocker.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: no folder here refuses it")
def test_a_folder_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputRefused, match="no file can be created in .*permission denied"):
            check_output(locked / "scores.jsonl", "-o", FILE)
    finally:
        locked.chmod(0o700)


def test_only_the_commands_own_earlier_output_is_replaced_without_overwrite(tmp_path):
    own = OwnFiles(lambda name: name in ("scored.jsonl", "report.md"))
    out = tmp_path / "curated"
    out.mkdir()
    assert check_output(out, "-o", FOLDER, own=own) == out  # empty
    (out / "scored.jsonl").write_text("{}\n")
    (out / ".scored.jsonl.99999.tmp").write_text("")  # a killed writer's leftover is not the user's
    check_output(out, "-o", FOLDER, own=own)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputRefused, match=r"holds 1 entry this command did not write \(e.g. notes.txt\).*"
                                            "--overwrite"):
        check_output(out, "-o", FOLDER, own=own)
    check_output(out, "-o", FOLDER, own=own, overwrite=True)
    with pytest.raises(OutputRefused, match="already exists; pass --overwrite"):  # no own test: always asks
        check_output(out, "--out-dir", FOLDER)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("a line of mine\n")
    with pytest.raises(OutputRefused, match="a file is there that is not this command's earlier output"):
        check_output(mine, "-o", FILE, own=lambda p: False)
    assert mine.read_text() == "a line of mine\n"


# ----------------------------------------------------------------------------------------------
# The commands on a tiny export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import export_tiny

    return export_tiny(tmp_path_factory.mktemp("outputs"), members=2)


def pairs_file(path: Path, n: int = 6, identical: int = 0) -> Path:
    def conv(i, reply):
        return [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": reply}]

    rows = [{"id": f"p{i}", "chosen": conv(i, f"It is {2 * i}."),
             "rejected": conv(i, f"It is {2 * i}." if i < identical else f"It is {2 * i + 1}.")} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_score_into_its_own_input_and_curate_into_the_folder_of_its_input_change_nothing(tiny, tmp_path):
    _, _, model = tiny
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": "hello"}]}) + "\n"
                            for i in range(3)))
    before = snapshot(tmp_path)
    line = one_error(runner.invoke(app, ["score", str(model), "-i", str(rows), "-o", str(rows), "--device", "cpu"]))
    assert f"-o {rows}: it is --input {rows}" in line
    assert snapshot(tmp_path) == before
    folder = tmp_path / "data"
    folder.mkdir()
    source = pairs_file(folder / "p.jsonl")
    (folder / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        line = one_error(runner.invoke(app, ["curate", str(model), "--input", str(source), "--out-dir", str(folder),
                                             "--device", "cpu", *extra]))
        assert f"--out-dir {folder}: it holds --input {source}" in line
        assert snapshot(tmp_path) == before


def test_an_earlier_output_is_replaced_and_the_users_file_only_with_overwrite(tiny, tmp_path):
    _, _, model = tiny
    source = pairs_file(tmp_path / "p.jsonl")
    out = tmp_path / "scores.jsonl"
    args = ["score", str(model), "-i", str(source), "-o", str(out), "--device", "cpu"]
    for _ in range(2):  # a rerun replaces its own earlier scores
        assert runner.invoke(app, args).exit_code == 0
    out.write_text("my notes\n")
    line = one_error(runner.invoke(app, args))
    assert "not this command's earlier output; pass --overwrite" in line and out.read_text() == "my notes\n"
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert json.loads(out.read_text().splitlines()[0])["id"] == "p0"


def test_curate_drops_identical_pairs_as_extract_does(tiny, tmp_path):
    _, _, model = tiny
    source = pairs_file(tmp_path / "p.jsonl", n=6, identical=2)
    result = runner.invoke(app, ["curate", str(model), "-i", str(source), "--out-dir", str(tmp_path / "c"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning: 2 of 6 pairs dropped: their chosen is identical to their rejected" in result.output
    assert "curated 4 pairs (2 identical pairs dropped)" in result.output
    scored = [json.loads(line)["id"] for line in (tmp_path / "c" / "scored.jsonl").read_text().splitlines()]
    assert scored == ["p2", "p3", "p4", "p5"]
    assert "2 dropped as read: chosen identical to rejected" in (tmp_path / "c" / "report.md").read_text()
    every = pairs_file(tmp_path / "same.jsonl", n=3, identical=3)
    line = one_error(runner.invoke(app, ["curate", str(model), "-i", str(every), "--out-dir", str(tmp_path / "d"),
                                         "--device", "cpu"]))
    assert "all 3 pairs have chosen identical to rejected" in line and not (tmp_path / "d").exists()


def test_curate_reads_a_cache_only_while_its_source_is_what_was_extracted(tiny, tmp_path):
    bb, heads, _ = tiny
    source = pairs_file(tmp_path / "pairs.jsonl", n=6)
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["extract", "--backbone", str(bb), "--cache-dir", str(cache), "--device", "cpu",
                                 "--kind", "preferences", "--source", str(source), "--name", "pairs", "--limit", "5"])
    assert result.exit_code == 0, result.output
    read = json.loads((cache / "pairs" / "_manifest.json").read_text())["info"]["source_read"]
    assert read == {"source": str(source), "split": "train", "format": None, "limit": 5}
    args = ["curate", str(heads), "-i", str(cache / "pairs"), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out-dir", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output  # as extracted (its first 5 rows): curated
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rows[1]["chosen"], rows[1]["rejected"] = rows[1]["rejected"], rows[1]["chosen"]  # the labels swapped since
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_error(runner.invoke(app, [*args, "--out-dir", str(tmp_path / "b")]))
    assert f"{cache / 'pairs'}: its source {str(source)!r} is not what the cache was extracted from" in line
    assert not (tmp_path / "b").exists()


def test_a_full_stdout_is_one_line(tiny, tmp_path):
    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full here")
    _, _, model = tiny
    source = pairs_file(tmp_path / "p.jsonl")
    urm = Path(sys.executable).parent / "urm"
    with open("/dev/full", "w") as full:
        done = subprocess.run([str(urm), "score", str(model), "-i", str(source), "--device", "cpu"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1 and "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert errors == ["error: cannot write the scores to stdout: no space left on the device: free some space, or "
                      "write elsewhere"], done.stderr


def test_evaluate_writes_its_report_folder_whole_or_not_at_all(tiny, tmp_path, monkeypatch):
    import pipeline.eval.report as R
    from pipeline.atomic import WRITE_CAUSES

    bb, heads, model = tiny
    cache = tmp_path / "cache"
    extract = ["extract", "--backbone", str(bb), "--cache-dir", str(cache), "--device", "cpu", "--kind",
               "preferences", "--source", "synthetic:preferences?n=6&seed=2", "--name", "pairs"]
    assert runner.invoke(app, extract).exit_code == 0
    report = tmp_path / "eval"
    args = ["evaluate", str(model), "--eval-preferences", str(cache / "pairs"), "--no-baselines", "--report-dir",
            str(report), "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0
    before = snapshot(report)
    assert "report.json" in before and any(name.endswith(".png") for name in before)
    real = R.write_json

    def full_disk(path, value):  # the plots are written, then report.json meets a full disk
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(R, "write_json", full_disk)
    line = one_error(runner.invoke(app, args))
    assert line == f"error: cannot write {report}: {WRITE_CAUSES[errno.ENOSPC]}"
    assert snapshot(report) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "eval"]
    monkeypatch.setattr(R, "write_json", real)
    (report / "mine.txt").write_text("notes")
    line = one_error(runner.invoke(app, args))
    assert "holds 1 entry this command did not write (e.g. mine.txt)" in line and (report / "mine.txt").exists()
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0 and not (report / "mine.txt").exists()


def test_export_holds_the_heads_whole_while_a_training_writes_them(tiny, tmp_path):
    """A training holding the heads folder refuses the export (naming its pid); an export holding it refuses a
    training; and a copy whose tensors are not the ones heads.json describes is never exported."""
    import shutil

    from pipeline.model import HeadsError, copy_heads, heads_reader, heads_writer

    bb, heads, _ = tiny
    held = tmp_path / "heads"
    shutil.copytree(heads, held)
    out = tmp_path / "m"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pipeline.model import heads_writer
with heads_writer({str(held)!r}):
    print("holding", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        line = one_error(runner.invoke(app, ["export", "--backbone", str(bb), "--heads-dir", str(held), "--out-dir",
                                             str(out)]))
        assert f"{held}: a training is writing these heads now (process {holder.pid})" in line
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with heads_reader(held):  # in this process: an export's shared lock
        child = subprocess.run([sys.executable, "-c", f"""
from pipeline.model import heads_writer
try:
    with heads_writer({str(held)!r}):
        pass
except Exception as e:
    print(e)
"""], capture_output=True, text=True, timeout=120)
        assert f"an export is copying these heads now (process {os.getpid()})" in child.stdout, child.stderr
    with heads_writer(held):
        pass  # free again
    other = tmp_path / "other"
    shutil.copytree(heads, other)
    (other / "heads.safetensors").write_bytes((heads / "heads.safetensors").read_bytes()[:-8] + bytes(8))
    with pytest.raises(HeadsError, match="is not the file heads.json describes"):
        copy_heads(other, tmp_path / "t.safetensors", tmp_path / "t.json")
    assert runner.invoke(app, ["export", "--backbone", str(bb), "--heads-dir", str(held), "--out-dir",
                               str(out)]).exit_code == 0
    assert (out / "heads.json").read_bytes() == (held / "heads.json").read_bytes()
    assert (out / "urm-heads.safetensors").read_bytes() == (held / "heads.safetensors").read_bytes()


@pytest.mark.integration
def test_a_blank_api_key_in_the_environment_is_refused_like_the_option(tiny):
    _, _, model = tiny
    urm = Path(sys.executable).parent / "urm"
    for value in ("", "   "):
        env = {**os.environ, "URM_API_KEY": value}
        done = subprocess.run([str(urm), "serve", str(model), "--device", "cpu", "--port", "0"], env=env,
                              capture_output=True, text=True, timeout=120)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and "listening" not in done.stdout, done.stdout + done.stderr
        assert errors == ["error: --api-key (or URM_API_KEY) must be a non-empty string of visible ASCII characters "
                          "without spaces (the key is not shown here)"]
    done = subprocess.run([str(urm), "serve", str(model), "--device", "cpu", "--port", "0", "--open-health"],
                          env={k: v for k, v in os.environ.items() if k != "URM_API_KEY"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "--open-health" in done.stderr and "listening" not in done.stdout


def test_the_key_is_in_no_repr_record_or_message():
    from pipeline.configs import ConfigError, ServeConfig, check_preset, to_dict
    from pipeline.serve.app import Access

    key = "sk-very-secret-0123"
    cfg = ServeConfig(api_key=key)
    assert key not in repr(cfg) and key not in repr(Access(key, True)) and key not in json.dumps(to_dict(cfg))
    with pytest.raises(ConfigError) as e:
        ServeConfig(api_key=f"{key} with spaces")
    assert key not in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_preset({"serve": {"api_key": [key]}}, "p.toml")
    assert key not in str(e.value) and "api_key" in str(e.value)
