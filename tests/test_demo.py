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


def test_urm_score_on_the_demo_export_prints_epistemic_std_per_row_as_the_closed_form_by_hand(tiny_demo, tmp_path):
    """Each row of `urm score` states epistemic_std and its per-attribute parts, equal to the ridge posterior
    s_k^2 [c^2 / cᵀc + zᵀ (ZᵀZ + alpha_k I)^-1 z] solved directly in float64 on the demo's own ratings cache, at the
    alpha and leave-one-out MSE heads.json records (docs/method.md 10)."""
    import json

    import numpy as np

    from pipeline.cache import read_features
    from pipeline.model import read_meta
    from test_closed_form import by_hand_epistemic_variance

    root, _, _ = tiny_demo
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"id": f"c{i}", "messages": c}) + "\n" for i, c in enumerate(sigmoid_example())))
    result = runner.invoke(app, ["score", str(root / "model"), "-i", str(convs), "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(r["epistemic_std"] > 0 for r in rows)
    meta = read_meta(root / "heads")
    selection, names = meta.value_head.selection, meta.attributes
    features = read_features(root / "cache" / "ratings")
    x, labels = features.embedding.double().numpy(), features.labels.numpy()
    model = load_export(root / "model")
    with torch.no_grad():
        h = torch.cat([model.model(torch.tensor([ids])).last_hidden_state[:, -1]
                       for ids in render_ids(tokenizer_of(root / "model"), sigmoid_example())]).double().numpy()
    for k, name in enumerate(names):
        want = by_hand_epistemic_variance(x, ~np.isnan(labels[:, k]), selection["alpha"][name],
                                          selection["loo_mse"][name], h, bias=False)
        got = [r["attribute_epistemic_stds"][name] ** 2 for r in rows]
        np.testing.assert_allclose(got, want, rtol=1e-3, err_msg=name)
    for r in rows:  # the score's, under the row's own gate weights
        w = np.array([r["gating_weights"][a] for a in names])
        e = np.array([r["attribute_epistemic_stds"][a] for a in names])
        assert r["epistemic_std"] == pytest.approx(np.sqrt((w ** 2 * e ** 2).sum()), rel=1e-5)
