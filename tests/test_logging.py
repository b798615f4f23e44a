"""One way to speak to the user: every module under ``pipeline/`` logs to its own logger, and `urm` alone decides
where the lines go (stderr, their words alone) and how many (``--quiet`` / ``-v``). Checked on the source tree (no
bare ``print``, no ``log`` parameter; a planted one is caught) and through the CLI."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.data.testing import linear_ratings
from test_train import write_cache

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def speaking_outside_logging(root: Path) -> list[str]:
    """file:line of every bare ``print(`` call and every function parameter named ``log`` under ``root/pipeline``."""
    found = []
    for file in sorted((root / "pipeline").rglob("*.py")):
        where = file.relative_to(root)
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{where}:{node.lineno}: print(")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                named = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if p is not None]
                if "log" in named:
                    found.append(f"{where}:{node.lineno}: a parameter named log")
    return found


def test_nothing_under_pipeline_prints_or_takes_a_log_parameter():
    assert speaking_outside_logging(ROOT) == []


def test_a_planted_print_and_log_parameter_are_found(tmp_path):
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    assert speaking_outside_logging(tmp_path) == []
    reader = tmp_path / "pipeline" / "cache" / "reader.py"
    reader.write_text(reader.read_text() + "\n\ndef planted(rows, log=print):\n    log(rows)\n    print('done')\n")
    found = speaking_outside_logging(tmp_path)
    assert len(found) == 2 and all(f.startswith("pipeline/cache/reader.py:") for f in found), found
    assert found[0].endswith("a parameter named log") and found[1].endswith("print("), found


@pytest.fixture
def ratings_cache(tmp_path) -> Path:
    h, y = linear_ratings(n=200, d=8)
    return write_cache(tmp_path / "ratings", h.to(torch.float16), y.numpy())


def train(cache: Path, tmp_path: Path, *flags: str):
    return runner.invoke(app, [*flags, "train-value-head", "--ratings-cache", str(cache), "--heads-dir",
                               str(tmp_path / "heads"), "--device", "cpu"])


def test_urm_prints_the_progress_lines_on_stderr_and_the_result_on_stdout(ratings_cache, tmp_path):
    result = train(ratings_cache, tmp_path)
    assert result.exit_code == 0, result.output
    assert "value head (ridge): alpha" in result.stderr and "value head (ridge)" not in result.stdout
    assert result.stdout.startswith("value head: val MSE") and "settings" not in result.output  # no debug lines


def test_quiet_keeps_the_result_and_drops_the_progress_lines(ratings_cache, tmp_path):
    result = train(ratings_cache, tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and result.stdout.startswith("value head: val MSE"), result.output
    assert train(ratings_cache, tmp_path, "-q").stderr == ""
    noisy = runner.invoke(app, ["train-value-head", "--ratings-cache", str(ratings_cache), "--heads-dir",
                                str(tmp_path / "heads"), "--device", "cpu"], env={"URM_QUIET": "1"})
    assert noisy.exit_code == 0 and noisy.stderr == "", noisy.output


def test_quiet_still_says_why_a_command_failed(tmp_path):
    result = runner.invoke(app, ["-q", "train-value-head", "--ratings-cache", str(tmp_path / "nothing"),
                                 "--heads-dir", str(tmp_path / "heads")])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.output


def test_verbose_adds_the_debug_lines(ratings_cache, tmp_path):
    result = train(ratings_cache, tmp_path, "-v")
    assert result.exit_code == 0, result.output
    settings = [line for line in result.stderr.splitlines() if line.startswith("value_head settings (preset ")]
    assert len(settings) == 1 and "'ratings_cache': " in settings[0] and "value head (ridge): alpha" in result.stderr
    assert "ratings_cache" in settings[0].split("given as options or URM_ variables: ")[1]
    assert train(ratings_cache, tmp_path, "--verbose").stderr.count("value_head settings") == 1


def test_quiet_and_verbose_together_are_refused(tmp_path):
    result = runner.invoke(app, ["-q", "-v", "cache", "info", str(tmp_path)])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: --quiet and --verbose ask for opposite things: give one of them"], result.output


def test_each_command_leaves_the_pipeline_logger_as_it_found_it(ratings_cache, tmp_path):
    import logging

    package = logging.getLogger("pipeline")
    before = (package.level, package.propagate, list(package.handlers))
    train(ratings_cache, tmp_path, "-v")
    assert (package.level, package.propagate, list(package.handlers)) == before
