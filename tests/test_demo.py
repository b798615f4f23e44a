"""`urm demo` / `make demo` on a tiny random Llama: every step runs, the sigmoid example's numbers are the
export's own, the closing summary holds what the README promises, and a rerun reuses the caches."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.export import sigmoid_example
from pipeline.features import render_ids
from pipeline.recipes.demo import summary, verdict
from tiny_models import load_export, tokenizer_of

pytestmark = pytest.mark.integration
runner = CliRunner()


def test_the_sigmoid_example_is_scored_as_the_export_scores_it(tiny_demo):
    from pipeline.device import native_bf16_cpu

    root, _, result = tiny_demo
    dtype = torch.bfloat16 if native_bf16_cpu() else torch.float32  # `--dtype auto` on this CPU
    model = load_export(root / "model", dtype=dtype)
    ids = render_ids(tokenizer_of(root / "model"), sigmoid_example())
    example = result["example"]
    for got, x in zip(example["answers"], ids):
        with torch.no_grad():
            out = model(torch.tensor([x]))
        assert got["score"] == pytest.approx(out.logits[0, 0].item(), abs=1e-5)
        assert got["score_std"] == pytest.approx(out.score_std[0].item(), rel=1e-5)
    with torch.no_grad():
        p = model.p_chosen(model(torch.tensor([ids[1]])), model(torch.tensor([ids[0]])))
    assert example["dtype"] == str(dtype).removeprefix("torch.")  # `auto`: bf16 where the CPU has it natively
    assert example["p_answer2_gaussian"] == pytest.approx(p["p_chosen_gaussian"].item(), abs=1e-6)
    assert example["p_answer2_bt"] == pytest.approx(p["p_chosen_bt"].item(), abs=1e-6)
    assert 0 < example["p_answer2_bt"] < 1 and 0 < example["p_answer2_gaussian"] < 1


def test_the_summary_holds_the_example_the_tables_and_the_paths(tiny_demo):
    root, _, result = tiny_demo
    text = summary(result)
    example = result["example"]
    for answer in example["answers"]:
        assert f"score {answer['score']:+.3f} +- {answer['score_std']:.3f}" in text
    assert f"P(answer 2 better) = {example['p_answer2_gaussian']:.3f} under the Gaussians" in text
    assert verdict(example["p_answer2_gaussian"]) in text
    assert "| URM (these heads) |" in text and "| linear BT probe |" in text and "cov 90%" in text
    for path in (root / "cache", root / "heads", root / "model", root / "eval" / "report.md"):
        assert str(path) in text and path.exists()
    steps = [line for line in result["log"] if line.startswith("\n== [")]
    assert len(steps) == 5 and "extract" in steps[0] and "sigmoid" in steps[4]


@pytest.mark.parametrize("p, words", [(0.9, "answer 2, the right one"), (0.1, "answer 1, the wrong one"),
                                      (0.5, "cannot tell them apart")])
def test_the_verdict_reads_the_probability_either_way(p, words):
    assert words in verdict(p)


def test_a_rerun_reuses_the_caches_and_replaces_the_export(tiny_demo):
    root, preset, result = tiny_demo
    before = (root / "model" / "urm_export.json").stat().st_mtime_ns
    again = runner.invoke(app, ["demo", "--preset", str(preset)])
    assert again.exit_code == 0, again.output
    assert "0 parts written" in again.output and "parts written, 0 already" not in again.output
    assert (root / "model" / "urm_export.json").stat().st_mtime_ns != before
    # same seed, same caches: the same heads, so the same numbers
    assert f"score {result['example']['answers'][1]['score']:+.3f}" in again.output


def test_a_bad_preset_stops_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('dtype = "fp8"\n')
    result = runner.invoke(app, ["demo", "--preset", str(bad)])
    assert result.exit_code == 2 and "error:" in result.output and "dtype" in result.output
    assert "== [1/5]" not in result.output
