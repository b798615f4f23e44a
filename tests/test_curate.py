"""`urm curate`: the selection math against hand-computed values, then the command on the tiny demo's export:
40 real UltraFeedback pairs scored, suspects flagged, the most certain half kept as TRL rows that `urm extract`
reads back; a preference cache with its heads; `--select` on unlabelled pairs; bad input gives one line and
leaves nothing half written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.eval import Scores
from pipeline.eval.curation import (
    certainty,
    judge_pairs,
    kept_pairs,
    least_certain,
    suspects,
    uncertainty,
)

runner = CliRunner()


# ----------------------------------------------------------------------------------------------
# The math (fast)


def test_judged_pairs_hold_the_probabilities_and_the_members_disagreement():
    chosen = Scores(torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.4]), torch.tensor([[1.2, 0.8], [0.0, 0.5]]))
    rejected = Scores(torch.tensor([0.0, 1.0]), torch.tensor([0.4, 0.3]), torch.tensor([[0.0, 0.0], [1.5, 0.5]]))
    judged = judge_pairs(chosen, rejected, temperature_bt=2.0, temperature_gaussian=0.5)
    assert judged["p_chosen"].tolist() == pytest.approx([1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))])
    z = 1.0 / (0.5 * 0.5)  # d / (T sqrt(0.09 + 0.16))
    assert judged["p_chosen_gaussian"][0].item() == pytest.approx(0.5 * (1 + math.erf(z / math.sqrt(2))))
    # member gaps: (1.2, 0.8) and (-1.5, 0.0): std 0.2828 and 1.0607, mean over std 3.536 and -0.707
    assert judged["ensemble_disagreement"].tolist() == pytest.approx([0.4 / math.sqrt(2), 1.5 / math.sqrt(2)])
    assert judged["ensemble_z"].tolist() == pytest.approx([1.0 / (0.4 / math.sqrt(2)), -0.75 / (1.5 / math.sqrt(2))])


def test_the_keep_rule_takes_the_most_certain_share_less_the_suspects():
    p = torch.tensor([0.9, 0.1, 0.6, 0.7, 0.15, 0.55])
    suspect = suspects(p, 0.2)
    assert suspect.tolist() == [False, True, False, False, True, False]
    assert kept_pairs(p, suspect, 0.5).tolist() == [True, False, True, True, False, False]  # 0.9, 0.7, 0.6
    assert kept_pairs(p, suspect, 1.0).tolist() == (~suspect).tolist() == [True, False, True, True, False, True]
    assert kept_pairs(p, suspect, 0.5, drop_suspect_only=True).tolist() == (~suspect).tolist()
    # a suspect among the most certain is still dropped: certainty by another signal
    other = torch.tensor([0.0, 5.0, 1.0, 2.0, 0.5, 0.1])
    assert kept_pairs(other, suspect, 0.5).tolist() == [False, False, True, True, False, False]


def test_the_least_certain_pairs_are_those_nearest_a_coin_flip():
    judged = {"p_chosen": torch.tensor([0.9, 0.52, 0.3, 0.47, 0.05]),
              "p_chosen_gaussian": torch.tensor([0.8, 0.6, 0.5, 0.1, 0.9]),
              "ensemble_z": torch.tensor([3.0, -0.2, 1.0, 0.1, -4.0])}
    assert uncertainty(judged, "bt").tolist() == pytest.approx([0.1, 0.48, 0.3, 0.47, 0.05])
    assert least_certain(uncertainty(judged, "bt"), 2).tolist() == [1, 3]
    assert least_certain(uncertainty(judged, "gaussian"), 2).tolist() == [2, 1]
    assert least_certain(uncertainty(judged, "ensemble"), 3).tolist() == [3, 1, 2]
    assert certainty(judged, "ensemble").tolist() == pytest.approx([3.0, -0.2, 1.0, 0.1, -4.0])


def test_an_ensemble_signal_without_an_ensemble_is_a_clear_error():
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="--signal ensemble needs an ensemble"):
        certainty({"p_chosen": torch.tensor([0.5])}, "ensemble")
    with pytest.raises(UserError, match="--signal epistemic needs a ridge posterior"):
        certainty({"p_chosen": torch.tensor([0.5])}, "epistemic")


def test_the_epistemic_signal_is_p_chosen_under_the_posterior_of_the_two_scores():
    from pipeline.eval.curation import judge_pairs
    from pipeline.eval.evaluation import Scores

    chosen = Scores(torch.tensor([1.0, 0.5]), epistemic_std=torch.tensor([0.3, 2.0]))
    rejected = Scores(torch.tensor([0.0, 1.0]), epistemic_std=torch.tensor([0.4, 1.5]))
    judged = judge_pairs(chosen, rejected)
    # d / sqrt(e_c^2 + e_r^2): 1 / 0.5 = 2 -> Phi(2) = 0.97725; -0.5 / 2.5 = -0.2 -> Phi(-0.2) = 0.42074
    assert certainty(judged, "epistemic").tolist() == pytest.approx([0.977250, 0.420740], abs=1e-6)
    assert uncertainty(judged, "epistemic").tolist() == pytest.approx([0.022750, 0.420740], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# The command on the tiny demo's export (integration)


def curate(*args: str):
    return runner.invoke(app, ["curate", *args, "--device", "cpu"])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def uf40(shared_data, write_jsonl):
    """40 real UltraFeedback pairs: the shortest lines of its train sample (the tiny backbone has 1024 positions),
    in file order."""
    lines = (shared_data / "ultrafeedback-binarized-sample-train.jsonl").read_text().splitlines()
    shortest = sorted(sorted(range(len(lines)), key=lambda i: len(lines[i]))[:40])
    return write_jsonl("uf40.jsonl", [lines[i] for i in shortest])


@pytest.mark.integration
def test_curating_40_ultrafeedback_pairs_keeps_the_most_certain_half_as_trl_rows(tiny_demo, uf40, tmp_path):
    from pipeline.data import load_preferences

    root = tiny_demo[0]
    out = tmp_path / "curated"
    result = curate(str(root / "model"), "-i", str(uf40), "--out-dir", str(out), "--suspect-threshold", "0.45")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["curated.jsonl", "p_chosen.png", "report.md", "scored.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated", "uf40.jsonl"]  # no temp folder left
    scored = read_jsonl(out / "scored.jsonl")
    pairs, _ = load_preferences(str(uf40))
    same = [p.pair_id for p in pairs if p.chosen == p.rejected]  # UltraFeedback's sample has one: no preference
    assert same == ["uf40:18"] and "warning: 1 of 40 pairs dropped: their chosen is identical" in result.stderr
    pairs = [p for p in pairs if p.chosen != p.rejected]
    assert [r["id"] for r in scored] == [p.pair_id for p in pairs] and len(scored) == 39
    urm = json.loads((root / "model" / "config.json").read_text())["urm"]
    t = urm["pair_temperature"]["bt"]
    for r in scored:
        assert r["p_chosen"] == pytest.approx(1 / (1 + math.exp(-(r["score_chosen"] - r["score_rejected"]) / t)))
        assert r["suspect"] == (r["p_chosen"] < 0.45)
        assert r["signal"] == "gaussian" and r["certainty"] == r["p_chosen_gaussian"]
        assert r["ensemble_disagreement"] >= 0  # the demo's value head is an 8-member ensemble
        assert 0 < r["p_chosen_epistemic"] < 1  # and a ridge posterior
    # the rule: the 20 most certain, less the suspects among them
    ranked = sorted(range(39), key=lambda i: -scored[i]["certainty"])[:20]  # round(0.5 x 39) = 20 most certain
    expected = [scored[i]["id"] for i in sorted(ranked) if not scored[i]["suspect"]]
    assert [r["id"] for r in scored if r["kept"]] == expected
    curated = read_jsonl(out / "curated.jsonl")
    assert [r["id"] for r in curated] == expected and 0 < len(curated) < 39
    # a threshold that flags some pairs: suspects are never kept, whatever their rank
    lowest = min(r["p_chosen"] for r in scored)
    assert lowest < 0.5  # the model reverses some real pairs
    again = tmp_path / "again"
    result = curate(str(root / "model"), "-i", str(uf40), "--out-dir", str(again), "--suspect-threshold",
                    str((lowest + 0.5) / 2), "--keep-certain", "1")
    assert result.exit_code == 0, result.output
    rescored = read_jsonl(again / "scored.jsonl")
    assert 0 < sum(r["suspect"] for r in rescored) < 39
    assert [r["id"] for r in read_jsonl(again / "curated.jsonl")] == [r["id"] for r in rescored if not r["suspect"]]
    # urm extract's loader reads curated.jsonl back as the same conversations
    back, report = load_preferences(str(out / "curated.jsonl"))
    assert report.format == "conversational"
    by_id = {p.pair_id: p for p in pairs}
    assert all(b.chosen == by_id[b.pair_id].chosen and b.rejected == by_id[b.pair_id].rejected for b in back)
    text = (out / "report.md").read_text()
    assert "| scored | 39 |" in text and f"| kept (the most certain 50% of the pairs, less the suspects) | {len(curated)} |" in text
    assert "(1 dropped as read: chosen identical to rejected)" in text
    assert "curated 39 pairs (1 identical pair dropped)" in result.stderr


@pytest.mark.integration
def test_other_rules_and_the_cache_with_its_heads_give_the_same_judgements(tiny_demo, tmp_path):
    """--drop-suspect-only keeps every non-suspect; a preference cache scored by the heads on its features judges
    each pair as the export does on the conversations (its source is the synthetic generator: read back)."""
    root = tiny_demo[0]
    cache = root / "cache" / "eval_preferences"
    from_cache = tmp_path / "from-cache"
    result = curate(str(root / "heads"), "-i", str(cache), "--out-dir", str(from_cache), "--drop-suspect-only",
                    "--suspect-threshold", "0.4")
    assert result.exit_code == 0, result.output
    cached = read_jsonl(from_cache / "scored.jsonl")
    assert [r["kept"] for r in cached] == [not r["suspect"] for r in cached]
    assert len(read_jsonl(from_cache / "curated.jsonl")) == sum(r["kept"] for r in cached)
    from_file = tmp_path / "from-file"
    result = curate(str(root / "model"), "-i", "synthetic:preferences?n=40&seed=3", "--out-dir", str(from_file),
                    "--drop-suspect-only", "--suspect-threshold", "0.4")
    assert result.exit_code == 0, result.output
    exported = {r["id"]: r for r in read_jsonl(from_file / "scored.jsonl")}
    assert sorted(exported) == sorted(r["id"] for r in cached)
    for r in cached:
        assert r["p_chosen"] == pytest.approx(exported[r["id"]]["p_chosen"], abs=2e-3)  # cached features: bf16
    assert (from_cache / "curated.jsonl").read_text().count("\n") == len(read_jsonl(from_cache / "curated.jsonl"))


@pytest.mark.integration
def test_select_writes_the_pairs_the_model_is_least_sure_of(tiny_demo, write_jsonl, tmp_path):
    root = tiny_demo[0]
    rows = [{"id": f"u{i}", "prompt": f"What is {i} + {i}?", "responses": [str(2 * i), str(2 * i + 1)]}
            for i in range(8)]
    rows.append({"id": "msgs", "prompt": [{"role": "user", "content": "Capital of France?"}],
                 "responses": [[{"role": "assistant", "content": "Paris."}], "Lyon."]})
    out = tmp_path / "to-label"
    result = curate(str(root / "model"), "-i", str(write_jsonl("unlabelled.jsonl", rows)), "--select", "3",
                    "--out-dir", str(out), "--signal", "bt")
    assert result.exit_code == 0, result.output
    scored, selected = read_jsonl(out / "scored.jsonl"), read_jsonl(out / "selected.jsonl")
    assert len(scored) == 9 and len(selected) == 3
    assert all(s["signal"] == "bt" for s in selected)
    unsure = sorted((r["uncertainty"] for r in scored), reverse=True)
    assert [s["uncertainty"] for s in selected] == pytest.approx(unsure[:3])
    for s in selected:
        assert s["uncertainty"] == pytest.approx(0.5 - abs(s["p_a_better"] - 0.5))
        assert s["a"][-1]["role"] == "assistant" and s["b"][0]["role"] == "user"
    assert "least sure" in (out / "report.md").read_text()


@pytest.mark.integration
def test_bad_input_is_one_line_and_leaves_nothing_half_written(tiny_demo, write_jsonl, tmp_path, uf40):
    root = tiny_demo[0]
    out = tmp_path / "out"
    out.mkdir()  # an earlier curation's OUT_DIR (a folder of the user's own files is refused first: test_outputs)
    (out / "scored.jsonl").write_text('{"id": "earlier"}\n')
    (out / "report.md").write_text("# an earlier curation\n")
    conversations = write_jsonl("convs.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}])
    cases = [
        ((str(root / "model"), "-i", str(conversations), "--out-dir", str(out)), 1, "its rows hold no chosen/rejected pairs"),
        ((str(root / "model"), "-i", str(uf40), "--out-dir", str(out), "--keep-certain", "0"), 2, "--keep-certain must be"),
        ((str(root / "model"), "-i", str(uf40), "--out-dir", str(out), "--keep-certain", "1.5"), 2, "--keep-certain must be"),
        ((str(root / "model"), "-i", str(uf40), "--out-dir", str(out), "--suspect-threshold", "nan"), 2,
         "--suspect-threshold must be"),
        ((str(root / "model"), "-i", str(uf40), "--out-dir", str(out), "--signal", "ensembel"), 2, "did you mean 'ensemble'"),
        ((str(root / "model"), "-i", str(write_jsonl("one.jsonl", [{"prompt": "p", "responses": ["a"]}])),
          "--select", "2", "--out-dir", str(out)), 1, "expected a list of two responses"),
        ((str(root / "eval"), "-i", str(uf40), "--out-dir", str(out)), 1, "not a model directory"),
    ]
    for args, code, message in cases:
        result = curate(*args)
        assert result.exit_code == code, (args, result.output)
        lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]  # the load report
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, (args, result.output)
        assert sorted(p.name for p in out.iterdir()) == ["report.md", "scored.jsonl"]  # the earlier folder untouched
        assert (out / "scored.jsonl").read_text() == '{"id": "earlier"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convs.jsonl", "one.jsonl", "out", "uf40.jsonl"]


@pytest.mark.integration
def test_an_output_that_is_a_file_and_a_cache_of_ratings_are_refused_naming_them(tiny_demo, uf40, tmp_path):
    """Found by the fuzz test: an --out-dir that is a file was replaced by the folder (the user's file gone), and a
    ratings cache as --input got the cache reader's own words; now one line each, before anything is scored."""
    root = tiny_demo[0]
    mine = tmp_path / "notes.txt"
    mine.write_text("the user's own file")
    result = curate(str(root / "model"), "-i", str(uf40), "--out-dir", str(mine))
    assert result.exit_code == 1 and result.output.strip().splitlines() == [(
        f"error: --out-dir {mine}: a file stands there, and the output is a folder (replaced as a whole): give "
        "the path of a folder, or move the file away")], result.output
    assert mine.read_text() == "the user's own file"
    ratings = root / "cache" / "eval_ratings"
    for model in ("heads", "model"):
        result = curate(str(root / model), "-i", str(ratings), "--out-dir", str(tmp_path / "out"))
        assert result.exit_code == 1 and result.output.strip().splitlines() == [(
            f"error: --input {ratings}: a ratings cache, but --input takes a preferences cache; give it one extracted "
            "with `urm extract --kind preferences`")], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "uf40.jsonl"]


@pytest.mark.integration
def test_the_ensemble_signal_on_a_model_without_one_fails_before_scoring(tmp_path, write_jsonl):
    from tiny_models import export_tiny

    _, _, model = export_tiny(tmp_path, members=1)
    pairs = write_jsonl("p.jsonl", [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}])
    result = curate(str(model), "-i", str(pairs), "--out-dir", str(tmp_path / "out"), "--signal", "ensemble")
    assert result.exit_code == 1 and "--signal ensemble needs an ensemble" in result.output
    assert not (tmp_path / "out").exists()
    result = curate(str(model), "-i", str(pairs), "--out-dir", str(tmp_path / "out"), "--signal", "epistemic")
    assert result.exit_code == 1 and "--signal epistemic needs the heads' ridge posterior" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_best_of_n_rules_of_the_benchmark_against_hand_computed_values():
    from bench.curate import bon_rewards

    mu = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)  # 2 rows, 2 attributes
    sigma = torch.tensor([[0.3, 0.4], [1.0, 0.0]], dtype=torch.float64)
    members = torch.tensor([[[2.0, 0.0], [1.0, 3.0]], [[2.0, 2.0], [1.0, 1.0]]], dtype=torch.float64)  # [M, N, K]
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    r = bon_rewards(mu, sigma, members, w, k=2.0, lam=0.5)
    assert r["mean"].tolist() == pytest.approx([2.5, 2.5])
    assert r["lcb"].tolist() == pytest.approx([2.5 - 2 * math.sqrt(0.09 + 0.25 * 0.16), 2.5 - 2 * 1.0])
    # the members' w . mu: row 0 (2.0, 3.0), row 1 (2.5, 1.5): mean 2.5 and 2.0, unbiased variance 0.5 and 0.5
    assert r["min"].tolist() == pytest.approx([2.0, 1.5])
    assert r["uwo"].tolist() == pytest.approx([2.5 - 0.5 * 0.5, 2.0 - 0.5 * 0.5])
