"""`urm evaluate` (docs/method.md 6): the metrics of a model's outputs on pairs and ratings, and the command end
to end on a tiny model: every baseline in one report, the same numbers from an export as from its heads,
and caches from another backbone refused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.eval import Scores, attribute_metrics, pair_metrics, uncertainty_signals

runner = CliRunner()


# ----------------------------------------------------------------------------------------------
# The metrics of one model's outputs


def test_pair_metrics_on_known_scores():
    chosen = Scores(torch.tensor([2.0, 1.0, 0.0, 3.0]), score_std=torch.full((4,), 0.5),
                    ensemble_scores=torch.tensor([[2.0, 2.2], [1.0, 0.0], [0.0, 0.1], [3.0, 3.0]]))
    rejected = Scores(torch.tensor([1.0, 2.0, 0.0, 0.0]), score_std=torch.full((4,), 0.5),
                      ensemble_scores=torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    got = pair_metrics(chosen, rejected, ["math-prm", "math-prm", "hep-go", "alpacaeval-easy"], 2.0, 1.0)
    assert got["accuracy"] == 0.5 and got["per_subset"] == {"alpacaeval-easy": 1.0, "hep-go": 0.0, "math-prm": 0.5}
    assert set(got["rewardbench_sections"]) == {"Chat", "Reasoning"} and "rewardbench_mean" not in got  # 2 of 4
    assert got["calibration"]["temperature_bt"] == 2.0 and "ece_gaussian" in got["calibration"]
    assert set(got["signals"]) == {"score_gap", "score_std", "gaussian_p", "ensemble_std", "ensemble_range", "ensemble_z"}
    # the smallest gaps are the wrong pairs here (the tie and the -1): score_gap ranks them last
    assert got["signals"]["score_gap"]["auroc"] > 0.5
    signals = uncertainty_signals(chosen, rejected)
    assert signals["ensemble_range"].tolist() == pytest.approx([0.2, 1.0, 0.1, 0.0])
    assert signals["ensemble_z"][0].item() == pytest.approx(-1.1 / torch.tensor([1.0, 1.2]).std().item())  # gap / spread
    chosen.epistemic_std, rejected.epistemic_std = torch.tensor([0.3, 1.0, 0.0, 0.6]), torch.tensor([0.4, 0.0, 1.0, 0.8])
    assert uncertainty_signals(chosen, rejected)["epistemic_std"].tolist() == pytest.approx([0.5, 1.0, 1.0, 1.0])
    plain = pair_metrics(Scores(chosen.score), Scores(rejected.score), [None] * 4)
    assert set(plain["signals"]) == {"score_gap"} and "ece_gaussian" not in plain["calibration"]
    assert plain["per_subset"] == {} and "rewardbench_sections" not in plain


def test_attribute_metrics_need_means_and_report_intervals_only_with_stds():
    y = torch.tensor([[1.0, 2.0], [3.0, float("nan")], [4.0, 0.0]])
    mu = torch.tensor([[1.5, 2.0], [2.5, 1.0], [4.5, 1.0]])
    with_sigma = attribute_metrics(Scores(torch.zeros(3), attribute_means=mu, attribute_stds=torch.ones(3, 2)), y,
                                   ["a", "b"])
    assert with_sigma["per_attribute"]["a"]["mse"] == pytest.approx(0.25) and "coverage90" in with_sigma
    assert with_sigma["means_outside_label_range"] == pytest.approx(1 / 6)  # 4.5 > 4
    without = attribute_metrics(Scores(torch.zeros(3), attribute_means=mu), y, ["a", "b"])
    assert "coverage90" not in without and "nll" not in without["per_attribute"]["b"]
    assert attribute_metrics(Scores(torch.zeros(3)), y, ["a", "b"]) is None


# ----------------------------------------------------------------------------------------------
# The command, end to end on a tiny model

@pytest.fixture(scope="module")
def trained(tiny_demo):
    """A tiny reward-model backbone's caches, trained heads, and their export (conftest's `urm demo` run)."""
    root, preset, _ = tiny_demo
    return root, preset


@pytest.mark.integration
def test_every_baseline_in_one_report(trained):
    root, preset = trained
    result = runner.invoke(app, ["evaluate", "-p", str(preset)])
    assert result.exit_code == 0, result.output
    report = json.loads((root / "eval" / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["URM (these heads)", "linear BT probe", "ArmoRM recipe", "equal weights", "backbone's own score",
                     "URM, the seed's recipe", "URM, reparam, sigma as trained", "URM, nll",
                     "URM ensemble of 4, seeds only"]
    # what training chose by itself is in the report, and the shift check of every model that states uncertainty
    assert report["chosen"]["gating"]["chosen"] in ("equal", "global", "urm-warm", "softmax")
    assert set(report["chosen"]["value_head"]["alpha"]) == set(report["models"][0]["attributes"]["per_attribute"])
    shift = report["models"][0]["shift"]["eval_preferences"]
    assert set(shift["auroc"]) == {"score_std", "mean_sigma", "ensemble_std", "epistemic_std"}  # ridge: a posterior
    assert "epistemic_std" in report["models"][0]["pairs"]["eval_preferences"]["signals"]  # the wrong-pair check
    assert shift["rows"] == 2 * report["eval"]["preferences"]["eval_preferences"]["pairs"]  # each side a row
    assert {p.name for p in (root / "eval").iterdir()} == {"report.json", "report.md", "attributes.png",
                                                           "reliability-eval_preferences.png",
                                                           "coverage-eval_preferences.png"}
    markdown = (root / "eval" / "report.md").read_text()
    assert all(name in markdown for name in names) and "AUROC epistemic_std" in markdown and "cov 90%" in markdown
    assert "## Chosen automatically" in markdown and "## Off its data? eval_preferences" in markdown
    assert "| URM (these heads) |" in result.output and "report:" in result.output
    # the main row is the heads' own numbers on the held-out caches
    from pipeline.cache import read_features, read_pairs
    from pipeline.model import load_heads

    heads, _ = load_heads(root / "heads")
    pairs = read_pairs(root / "cache" / "eval_preferences")
    with torch.no_grad():
        s_c, s_r = heads(pairs.chosen.embedding)["score"], heads(pairs.rejected.embedding)["score"]
        mu = heads(read_features(root / "cache" / "eval_ratings").embedding)["attribute_means"]
    main = report["models"][0]
    assert main["pairs"]["eval_preferences"]["accuracy"] == pytest.approx((s_c > s_r).double().mean().item())
    y = read_features(root / "cache" / "eval_ratings").labels
    assert main["attributes"]["mse"] == pytest.approx((mu - y).square().mean().item(), rel=1e-5)
    ensemble = next(m for m in report["models"] if m["name"] == "URM ensemble of 4, seeds only")
    assert "ensemble_range" in ensemble["pairs"]["eval_preferences"]["signals"]
    probe = next(m for m in report["models"] if m["name"] == "linear BT probe")
    assert probe["attributes"] is None and set(probe["pairs"]["eval_preferences"]["signals"]) == {"score_gap"}


@pytest.mark.integration
def test_an_export_evaluates_like_its_heads_and_other_backbones_are_refused(trained, tmp_path):
    root, preset = trained
    runs = {}
    for source in ("heads", "model"):
        out = tmp_path / source
        result = runner.invoke(app, ["evaluate", str(root / source), "-p", str(preset), "--no-baselines",
                                     "--report-dir", str(out)])
        assert result.exit_code == 0, result.output
        runs[source] = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in runs["heads"]["models"]] == ["URM (these heads)"]
    # the export knows the longest conversation its heads were trained on: `urm score` drops longer ones
    assert json.loads((root / "model" / "config.json").read_text())["urm"]["max_length"] == 2048
    assert runs["heads"]["models"] == runs["model"]["models"]
    # a cache of another backbone (same hidden size, other weights): refused, naming the field
    from tiny_models import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", seed=5)
    result = runner.invoke(app, ["extract", "--backbone", str(other), "--cache-dir", str(tmp_path / "cache"),
                                 "--source", "synthetic:preferences?n=5&seed=3", "--kind", "preferences",
                                 "--name", "other", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "-p", str(preset), "--no-baselines", "--eval-preferences",
                                 str(tmp_path / "cache" / "other")])
    assert result.exit_code == 1 and "its backbone is" in result.output and "Traceback" not in result.output
    bare = tmp_path / "bare.toml"  # a preset without an [evaluate] table
    bare.write_text(preset.read_text().split("[evaluate]")[0])
    nothing = runner.invoke(app, ["evaluate", "-p", str(bare), "--no-baselines"])
    assert nothing.exit_code == 1 and "nothing to evaluate: give --eval-preferences" in nothing.output


def test_shift_metrics_tell_another_sources_rows_by_the_epistemic_spread():
    """Rows of another source whose members disagree more (epistemic) and whose sigma is as usual (aleatoric): the
    ensemble spread separates them (AUROC 1), sigma cannot (0.5); labels there give the coverage."""
    from pipeline.eval import row_signals, shift_metrics

    g = torch.Generator().manual_seed(0)
    def rows(n, spread):
        members = torch.randn(n, 4, generator=g) * spread
        return Scores(members.mean(-1), score_std=torch.ones(n), ensemble_scores=members,
                      attribute_means=torch.zeros(n, 2), attribute_stds=torch.ones(n, 2),
                      epistemic_std=torch.linspace(0, 1, n) + spread)
    ref, other = rows(50, 0.1), rows(60, 1.0)
    assert set(row_signals(ref)) == {"score_std", "mean_sigma", "ensemble_std", "epistemic_std"}
    labels = torch.randn(60, 2, generator=g) * 3  # three times the stated sigma: intervals too narrow there
    got = shift_metrics(ref, other, labels, ["a", "b"])
    assert got["rows"] == 60 and got["reference_rows"] == 50
    assert got["auroc"]["ensemble_std"] == pytest.approx(1.0) and got["auroc"]["score_std"] == pytest.approx(0.5)
    assert 0.9 < got["auroc"]["epistemic_std"] < 1  # 0.1..1.1 against 1..2: they overlap a little
    assert got["attributes"]["coverage90"] < 0.6
    assert "attributes" not in shift_metrics(ref, other)
