"""`urm score` (batched, with uncertainty) against the exported model one conversation at a time, the seed's
usage snippet against `urm score`, and, on SmolLM2 (slow), the export against the heads on cached features."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline import ATTRIBUTES
from pipeline.features import render_ids
from tiny_models import (CONVERSATIONS, TF457_VERSION, export_tiny, load_export, require_tf457, scores_here,
                         scores_under, tokenizer_of)

pytestmark = pytest.mark.integration  # every test exports (and loads) a model
runner = CliRunner()

SEED_SNIPPET = '''import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model_name = "LxzGordon/URM-llama3.1-8B"
model = AutoModelForSequenceClassification.from_pretrained(model_name, device_map='auto', trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(model_name)
prompt = "What is the range of the numeric output of a sigmoid node in a neural network?"
response1 = "The output of a sigmoid node is bounded between -1 and 1."
response2 = "The output of a sigmoid node is bounded between 0 and 1."
resp1 = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response1}]
resp2 = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response2}]
resp1 = tokenizer.apply_chat_template(resp1, tokenize=False)
resp2 = tokenizer.apply_chat_template(resp2, tokenize=False)
resp1 = tokenizer(resp1, return_tensors="pt").to(model.device)
resp2 = tokenizer(resp2, return_tensors="pt").to(model.device)
with torch.no_grad():
    score1 = model(resp1['input_ids'],attention_mask=resp1['attention_mask']).logits[0][0].item()
    score2 = model(resp2['input_ids'],attention_mask=resp2['attention_mask']).logits[0][0].item()
print(score1,score2)
'''
PROMPT = "What is the range of the numeric output of a sigmoid node in a neural network?"
SNIPPET_ROWS = [
    {"id": "resp1", "messages": [{"role": "user", "content": PROMPT}, {"role": "assistant",
                                 "content": "The output of a sigmoid node is bounded between -1 and 1."}]},
    {"id": "resp2", "messages": [{"role": "user", "content": PROMPT}, {"role": "assistant",
                                 "content": "The output of a sigmoid node is bounded between 0 and 1."}]},
]


def run_seed_snippet(model_dir: Path, tmp_path: Path) -> tuple[float, float]:
    """The seed's snippet verbatim but for model_name, in a fresh interpreter; its printed scores."""
    script = tmp_path / "seed_snippet.py"
    script.write_text(SEED_SNIPPET.replace('"LxzGordon/URM-llama3.1-8B"', repr(str(model_dir))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    # The printed line. Under transformers 5.x the snippet's AutoTokenizer (no trust_remote_code) reads
    # config.json, whose model_type "urm" it does not know, so it asks "run the custom code? [y/N]" (no
    # answer here: it goes on with the tokenizer alone); anything before the scores is that question.
    *before, last = done.stdout.strip().splitlines()
    asked, _, printed = last.rpartition("[y/N] ")
    question = "\n".join(before + [asked]).strip()
    assert not question or (question.endswith("Do you wish to run the custom code?") and "trust_remote_code" in question)
    score1, score2 = map(float, printed.split())
    return score1, score2


def urm_score(model_dir: Path, rows_file: Path, *options: str) -> list[dict]:
    """`urm score` through the CLI in float32 (compared with the model loaded in fp32), JSONL on stdout parsed."""
    result = runner.invoke(app, ["score", str(model_dir), "--input", str(rows_file), "--device", "cpu", "--dtype",
                                 "float32", *options])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny reward-model backbone, 2-member ensemble + URM gate + a ridge posterior, exported."""
    return export_tiny(tmp_path_factory.mktemp("score"), reward_model=True, members=2, posterior=True)


# ----------------------------------------------------------------------------------------------
# Tiny model (fast)


def test_batched_scores_equal_the_model_one_conversation_at_a_time(tiny, write_jsonl):
    out = tiny[2]
    rows = [{"id": f"c{i}", "messages": c} for i, c in enumerate(CONVERSATIONS * 3)]
    got = urm_score(out, write_jsonl("convs.jsonl", rows), "--max-tokens-per-batch", "64")  # several batches
    assert [r["id"] for r in got] == [r["id"] for r in rows]  # input order kept
    model = load_export(out)
    ids = render_ids(tokenizer_of(out), [r["messages"] for r in rows])
    for row, x in zip(got, ids):
        with torch.no_grad():
            one = model(torch.tensor([x]))
        assert row["score"] == pytest.approx(one.logits[0, 0].item(), abs=1e-5)
        assert row["score_std"] == pytest.approx(one.score_std[0].item(), rel=1e-5)
        assert list(row["attribute_means"]) == list(ATTRIBUTES)
        assert list(row["attribute_means"].values()) == pytest.approx(one.attribute_means[0].tolist(), abs=1e-5)
        assert list(row["attribute_stds"].values()) == pytest.approx(one.attribute_stds[0].tolist(), rel=1e-5)
        assert list(row["gating_weights"].values()) == pytest.approx(one.gating_weights[0].tolist(), abs=1e-5)
        assert row["ensemble_scores"] == pytest.approx(one.ensemble_scores[0].tolist(), abs=1e-5)
        assert row["base_score"] == pytest.approx(one.base_score[0].item(), abs=1e-5)
        assert row["epistemic_std"] == pytest.approx(one.epistemic_std[0].item(), rel=1e-5)
        assert list(row["attribute_epistemic_stds"]) == list(ATTRIBUTES)
        assert list(row["attribute_epistemic_stds"].values()) == pytest.approx(
            one.attribute_epistemic_stds[0].tolist(), rel=1e-5)
    # the score's std is sqrt(sum_k w_k^2 sigma_k^2) of the row's own numbers (docs/method.md 1)
    r = got[0]
    var = sum(r["gating_weights"][a] ** 2 * r["attribute_stds"][a] ** 2 for a in ATTRIBUTES)
    assert r["score_std"] == pytest.approx(math.sqrt(var), rel=1e-4)


def test_pairs_get_both_sides_and_both_probabilities(tiny, write_jsonl, tmp_path):
    rows = [{"id": "p1", "prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "subset": "math"},
            {"id": "p2", "prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "subset": "geo"}]
    output = tmp_path / "out" / "scores.jsonl"
    result = runner.invoke(app, ["score", str(tiny[2]), "-i", str(write_jsonl("pairs.jsonl", rows)), "-o", str(output),
                                 "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "scored 2 pairs" in result.stderr  # the summary goes to stderr
    assert [p.name for p in output.parent.iterdir()] == ["scores.jsonl"]  # no temp file left
    got = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(g["id"], g["subset"]) for g in got] == [("p1", "math"), ("p2", "geo")]
    for g in got:
        c, r = g["chosen"], g["rejected"]
        diff = c["score"] - r["score"]
        assert g["p_chosen_bt"] == pytest.approx(1 / (1 + math.exp(-diff)), rel=1e-6)
        z = diff / math.sqrt(c["score_std"] ** 2 + r["score_std"] ** 2)
        assert g["p_chosen_gaussian"] == pytest.approx(0.5 * (1 + math.erf(z / math.sqrt(2))), rel=1e-6)
    # the chosen side scores as the same conversation given alone
    alone = urm_score(tiny[2], write_jsonl("one.jsonl", [{"id": "x", "messages": [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}]))
    assert got[0]["chosen"]["score"] == pytest.approx(alone[0]["score"], abs=1e-5)


def test_pair_probabilities_use_the_temperatures_fitted_with_the_heads(tmp_path, write_jsonl):
    """Heads whose gate came with T_bt = 2 and T_gauss = 0.5: the export carries them in config.json, and
    `urm score` and the model's own p_chosen divide by them."""
    import dataclasses

    from pipeline.configs import ExportConfig
    from pipeline.model import PairCalibration, load_heads, save_heads
    from pipeline.recipes.export import export_model
    from tiny_models import build_tiny_llama, random_heads_dir

    bb = build_tiny_llama(tmp_path / "backbone")
    heads_dir = random_heads_dir(tmp_path / "heads", bb)
    heads, meta = load_heads(heads_dir)
    save_heads(heads_dir, heads, dataclasses.replace(meta, pair_calibration=PairCalibration(2.0, 0.5, 10, {}, {})))
    out = tmp_path / "model"
    export_model(ExportConfig(backbone=str(bb), heads_dir=str(heads_dir), out_dir=str(out)))
    assert json.loads((out / "config.json").read_text())["urm"]["pair_temperature"] == {"bt": 2.0, "gaussian": 0.5}
    rows = [{"id": "p", "prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}]
    (got,) = urm_score(out, write_jsonl("pairs.jsonl", rows))
    c, r = got["chosen"], got["rejected"]
    diff, spread = c["score"] - r["score"], math.sqrt(c["score_std"] ** 2 + r["score_std"] ** 2)
    assert got["p_chosen_bt"] == pytest.approx(1 / (1 + math.exp(-diff / 2.0)), rel=1e-6)
    assert got["p_chosen_gaussian"] == pytest.approx(0.5 * (1 + math.erf(diff / (0.5 * spread) / math.sqrt(2))), rel=1e-6)
    model, tok = load_export(out), tokenizer_of(out)
    with torch.no_grad():
        sides = [model(torch.tensor([x])) for x in render_ids(tok, [[{"role": "user", "content": "What is 2+2?"},
                                                                      {"role": "assistant", "content": a}]
                                                                     for a in ("4", "5")])]
    p = model.p_chosen(*sides)
    assert p["p_chosen_bt"].item() == pytest.approx(got["p_chosen_bt"], abs=1e-5)
    assert p["p_chosen_gaussian"].item() == pytest.approx(got["p_chosen_gaussian"], abs=1e-5)


def test_conversations_longer_than_the_limit_are_dropped_and_counted(tiny, write_jsonl):
    """The limit is the export's max_length (the longest the heads saw), --max-length, and never more than
    the backbone's positions; a pair with one side too long is dropped whole."""
    from pipeline.serve import length_hint, length_limit
    from pipeline.serve import ScoreError

    out = tiny[2]
    config = load_export(out).config
    assert length_limit(config, None) == config.max_position_embeddings == 1024  # heads.json named no length
    assert length_limit(config, 1024) == 1024 and length_limit(config, 30) == 30
    with pytest.raises(ScoreError, match="--max-length 99999 is more than the backbone's 1024 positions"):
        length_limit(config, 99_999)  # refused, not capped in silence
    assert length_hint(config, 1024).startswith("the backbone takes at most 1024 positions")
    assert length_hint(config, 30).startswith("--max-length up to 1024")
    short, long = CONVERSATIONS[0], CONVERSATIONS[2]  # 2 + 4 words vs a five-turn conversation
    n_short, n_long = (len(x) for x in render_ids(tokenizer_of(out), [short, long]))
    limit = str((n_short + n_long) // 2)
    convs = write_jsonl("mixed.jsonl", [{"id": "short", "messages": short}, {"id": "long", "messages": long}])
    result = runner.invoke(app, ["score", str(out), "-i", str(convs), "--max-length", limit])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["short"]
    assert "dropped 1 conversations longer than max_length" in result.stderr and "1 dropped as too long" in result.stderr
    pairs = write_jsonl("pairs.jsonl", [{"id": "a", "chosen": short, "rejected": long},
                                        {"id": "b", "chosen": short, "rejected": short}])
    result = runner.invoke(app, ["score", str(out), "-i", str(pairs), "--max-length", limit])
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["b"]  # pair a dropped whole
    result = runner.invoke(app, ["score", str(out), "-i", str(convs), "--max-length", "3"])
    assert result.exit_code == 1 and "all 2 rows are longer than max_length=3" in result.output
    assert "--max-length up to 1024 (the backbone's positions) raises the limit" in result.output
    result = runner.invoke(app, ["score", str(out), "-i", str(convs), "--max-length", "1025"])
    assert result.exit_code == 1 and "--max-length 1025 is more than the backbone's 1024 positions" in result.output


def test_helpsteer2_rows_are_conversations(tiny, write_jsonl):
    rows = [{"prompt": "What is 2+2?", "response": "4", "helpfulness": 4}]
    got = urm_score(tiny[2], write_jsonl("hs2.jsonl", rows))
    assert len(got) == 1 and got[0]["id"] == "hs2:1" and "chosen" not in got[0]


def test_scoring_something_that_is_not_an_export_is_one_clear_line(tiny, write_jsonl):
    convs = write_jsonl("c.jsonl", [{"messages": CONVERSATIONS[0]}])
    result = runner.invoke(app, ["score", str(tiny[0]), "-i", str(convs)])  # the backbone, not an export
    assert result.exit_code == 1 and "no 'urm' section, so not a model exported by `urm export`" in result.output
    bad = write_jsonl("bad.jsonl", [{"messages": [{"role": "user", "content": "no reply"}]}])
    result = runner.invoke(app, ["score", str(tiny[2]), "-i", str(bad)])
    assert result.exit_code == 1 and "must end with an assistant turn" in result.output
    assert "Traceback" not in result.output


def test_reward_lcb_is_score_minus_k_std_per_row_and_the_others_as_stated(tiny, write_jsonl, tmp_path):
    convs = write_jsonl("convs.jsonl", [{"id": f"c{i}", "messages": c} for i, c in enumerate(CONVERSATIONS)])
    output = tmp_path / "lcb.jsonl"
    result = runner.invoke(app, ["score", str(tiny[2]), "--input", str(convs), "-o", str(output), "--reward", "lcb",
                                 "--risk", "1", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == len(CONVERSATIONS)
    for r in rows:  # reward = score - 1 x score_std, from the row's own numbers
        assert r["reward"] == pytest.approx(r["score"] - r["score_std"], abs=1e-6)
    mean = urm_score(tiny[2], convs)
    assert [r["reward"] for r in mean] == [r["score"] for r in mean]  # the default: the score itself
    assert [r["score"] for r in mean] == [r["score"] for r in rows]  # the transform changes only `reward`
    for r in urm_score(tiny[2], convs, "--reward", "lcb", "--risk", "2.5"):
        assert r["reward"] == pytest.approx(r["score"] - 2.5 * r["score_std"], abs=1e-6)
    for r in urm_score(tiny[2], convs, "--reward", "elcb", "--risk", "2"):  # the epistemic std, not score_std
        assert r["reward"] == pytest.approx(r["score"] - 2 * r["epistemic_std"], abs=1e-6)
        assert r["epistemic_std"] != pytest.approx(r["score_std"])
    for r in urm_score(tiny[2], convs, "--reward", "min"):
        assert r["reward"] == pytest.approx(min(r["ensemble_scores"]), abs=1e-6)
    for r in urm_score(tiny[2], convs, "--reward", "uwo", "--risk", "0.5"):
        m = r["ensemble_scores"]
        assert r["reward"] == pytest.approx(sum(m) / 2 - 0.5 * r["ensemble_std"] ** 2, abs=1e-6)
    pairs = write_jsonl("pairs.jsonl", [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}])
    got = urm_score(tiny[2], pairs, "--reward", "lcb", "--risk", "1")[0]
    for side in (got["chosen"], got["rejected"]):
        assert side["reward"] == pytest.approx(side["score"] - side["score_std"], abs=1e-6)


def test_a_reward_the_export_cannot_give_or_a_bad_risk_is_one_line_and_writes_nothing(tmp_path, write_jsonl):
    single = export_tiny(tmp_path / "single", members=1)[2]
    convs = write_jsonl("convs.jsonl", [{"messages": CONVERSATIONS[0]}])
    output = tmp_path / "out" / "scores.jsonl"
    for args, code, says in ((["--reward", "min"], 1, "--reward 'min' needs an ensemble, and this export has 1 value "
                                                      "head"),
                             (["--reward", "uwo"], 1, "--reward 'uwo' needs an ensemble"),
                             (["--reward", "elcb"], 1, "--reward 'elcb' needs the heads' ridge posterior"),
                             (["--risk", "-1"], 2, "--risk must be a number from 0 to 1e6, got -1.0"),
                             (["--risk", "inf"], 2, "--risk must be a number from 0 to 1e6, got inf"),
                             (["--risk", "1e308"], 2, "--risk must be a number from 0 to 1e6, got 1e+308"),
                             (["--reward", "LCB"], 2, "--reward must be one of mean, lcb, elcb, min, uwo, got 'LCB'")):
        result = runner.invoke(app, ["score", str(single), "-i", str(convs), "-o", str(output), *args])
        assert result.exit_code == code and says in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert not output.parent.exists()
    assert urm_score(single, convs, "--reward", "lcb")[0]["reward"] is not None  # lcb needs no ensemble


def test_seed_snippet_runs_on_an_export_and_matches_urm_score(tiny, write_jsonl, tmp_path):
    score1, score2 = run_seed_snippet(tiny[2], tmp_path)  # templated text tokenised again: two BOS here
    got = urm_score(tiny[2], write_jsonl("snippet.jsonl", SNIPPET_ROWS))
    assert score1 != score2
    assert [score1, score2] == pytest.approx([got[0]["score"], got[1]["score"]], abs=1e-5)


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M (slow): extract a few rows, train small heads on the cache, export once for all tests

SMOLLM2_ROWS = "synthetic:ratings?n=24&seed=0"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from pipeline.cache import read_features
    from pipeline.configs import (SMOLLM2_GGUF, DatasetSpec, ExportConfig, ExtractConfig, GatingConfig,
                                  ValueHeadConfig, build)
    from pipeline.model import CacheIdentity, HeadsMeta, save_heads
    from pipeline.recipes.export import export_model
    from pipeline.recipes.extract import run_extract
    from pipeline.recipes.train import stage_record
    from pipeline.train import fit_gate, fit_value_head

    root = tmp_path_factory.mktemp("smollm2")
    spec = DatasetSpec(name="ratings", kind="ratings", source=SMOLLM2_ROWS)
    run_extract(ExtractConfig(backbone=SMOLLM2_GGUF, cache_dir=str(root / "cache"), storage_dtype="float32",
                              dtype="float32", device="cpu", max_tokens_per_batch=4096, datasets={"ratings": spec}))
    cache = root / "cache" / "ratings"
    features = read_features(cache)
    identity = CacheIdentity.of(cache, features.manifest)
    x, n = features.embedding, len(features) // 2
    vcfg = build(ValueHeadConfig, dict(loss="nll", epochs=30, patience=30, batch_size=8, lr=1e-3, ensemble=2,
                                       val_fraction=0.25, device="cpu"))
    value = fit_value_head(x, features.labels, vcfg)
    gcfg = build(GatingConfig, dict(gate="urm", gate_hidden=32, gate_epochs=3, gate_batch_size=4, gate_lr=1e-3,
                                    gate_val_fraction=0.25, device="cpu"))
    gated = fit_gate(x[:n], x[n:2 * n], value.heads, gcfg)  # any pairs: the gate only has to exist
    meta = HeadsMeta(attributes=list(ATTRIBUTES), hidden_size=gated.heads.d, architecture=gated.heads.architecture,
                     value_head=stage_record(vcfg, value, identity), label_scaling=value.label_scaling,
                     gating=stage_record(gcfg, gated, identity))
    save_heads(root / "heads", gated.heads, meta)
    out = root / "model"
    export_model(ExportConfig(heads_dir=str(root / "heads"), out_dir=str(out)))  # backbone from heads.json
    return SimpleNamespace(root=root, cache=cache, heads=root / "heads", out=out, features=features)


@pytest.mark.slow
def test_smollm2_export_scores_equal_the_heads_on_cached_features(smollm2):
    from pipeline.configs import ScoreConfig, build
    from pipeline.model import load_heads
    from pipeline.recipes.score import score_file

    output = smollm2.root / "scores.jsonl"
    score_file(str(smollm2.out), build(ScoreConfig, dict(input=SMOLLM2_ROWS, output=str(output), device="cpu",
                                                          dtype="float32", max_tokens_per_batch=2048)))
    got = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    with torch.no_grad():
        expected = load_heads(smollm2.heads)[0](smollm2.features.embedding)
    ids = list(smollm2.features.id)
    assert sorted(got) == sorted(ids) and len(ids) == 24
    diff = {
        "score": max(abs(got[i]["score"] - expected["score"][j].item()) for j, i in enumerate(ids)),
        "score_std": max(abs(got[i]["score_std"] - expected["score_std"][j].item()) for j, i in enumerate(ids)),
        "mean": max(abs(got[i]["attribute_means"][a] - expected["attribute_means"][j, k].item())
                    for j, i in enumerate(ids) for k, a in enumerate(ATTRIBUTES)),
        "ensemble_std": max(abs(got[i]["ensemble_std"] - expected["ensemble_std"][j].item()) for j, i in enumerate(ids)),
    }
    print(f"SmolLM2 export vs heads on cached features, max abs diff: {diff}")
    assert max(diff.values()) <= 1e-4, diff
    assert expected["score"].std() > 1e-3  # scores that differ across rows: a real comparison


@pytest.mark.slow
def test_smollm2_seed_snippet_matches_urm_score(smollm2, write_jsonl, tmp_path):
    score1, score2 = run_seed_snippet(smollm2.out, tmp_path)
    got = urm_score(smollm2.out, write_jsonl("snippet.jsonl", SNIPPET_ROWS), "--dtype", "float32")
    print(f"SmolLM2 snippet {score1:.6f} {score2:.6f}; urm score {got[0]['score']:.6f} {got[1]['score']:.6f}")
    assert [score1, score2] == pytest.approx([got[0]["score"], got[1]["score"]], abs=1e-4)


@pytest.mark.slow
def test_smollm2_export_scores_the_same_under_transformers_457(smollm2, tmp_path):
    require_tf457()
    conversations = [r["messages"] for r in SNIPPET_ROWS]
    ids = render_ids(tokenizer_of(smollm2.out), conversations)
    old = scores_under(smollm2.out, conversations, ids, tmp_path)
    new = scores_here(smollm2.out, conversations, ids)
    print(f"SmolLM2 transformers {TF457_VERSION}: {old}; 5.x: {new}")
    assert old["version"] == TF457_VERSION
    assert old["ids"] == pytest.approx(new["ids"], abs=1e-4)
    assert old["snippet"] == pytest.approx(new["ids"], abs=1e-4)


# ----------------------------------------------------------------------------------------------
# The compute dtype: bf16 where the CPU runs it natively, loaded without a second copy (issue 26)


@pytest.mark.parametrize("native", [True, False])
def test_auto_scores_in_bf16_where_the_cpu_has_it_and_says_what_fp32_costs_where_not(tiny, monkeypatch, native, said):
    import pipeline.device as device
    from pipeline.serve import load_scorer

    monkeypatch.setattr(device, "native_bf16_cpu", lambda: native)
    model, _ = load_scorer(str(tiny[2]), "auto", "cpu")
    backbone = {p.dtype for p in model.model.parameters()}
    heads = {p.dtype for name, p in model.named_parameters() if not name.startswith("model.")}
    assert backbone == {torch.bfloat16 if native else torch.float32} and heads == {torch.float32}  # heads stay fp32
    _, count = device.stored_parameters(tiny[2])
    if native:
        assert said() == []
    else:
        (note,) = said()
        assert f"about {count * 4 / 1e9:.1f} GB" in note and "--dtype bfloat16 halves" in note
    model32, _ = load_scorer(str(tiny[2]), "float32", "cpu")  # asked for: no note
    assert {p.dtype for p in model32.parameters()} == {torch.float32} and len(said()) == (0 if native else 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_loading_into_a_dtype_by_casting_gives_what_loading_in_it_gives(tiny, dtype):
    """load_in_dtype reads the files in their own dtype and casts parameter by parameter (no second full copy):
    the weights, buffers and outputs are those of transformers loading straight into the dtype."""
    from pipeline.device import load_in_dtype, stored_parameters
    from pipeline.model.modeling_urm import URMForSequenceClassification
    from pipeline.serve import export_config

    out = tiny[2]
    config = export_config(str(out))
    load = lambda dt: URMForSequenceClassification.from_pretrained(out, config=config, dtype=dt).eval()  # noqa: E731
    keep = tuple(f"{m}." for m in URMForSequenceClassification.HEAD_MODULES)
    stored, count = stored_parameters(out)
    assert stored == "float32" and count == sum(p.numel() for p in load(torch.float32).parameters())
    direct, cast = load(dtype), load_in_dtype(load, out, dtype, keep)
    a, b = direct.state_dict(), cast.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([render_ids(tokenizer_of(out), CONVERSATIONS[:1])[0]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cast(ids).logits)


def test_a_bf16_checkpoint_loads_into_fp32_by_casting_as_transformers_loads_it(tiny, tmp_path):
    """The other way (a bf16 checkpoint, as Skywork's, scored or extracted in fp32 on a CPU without native bf16)."""
    from transformers import AutoModel

    from pipeline.device import load_in_dtype, stored_parameters

    AutoModel.from_pretrained(tiny[0], dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert stored_parameters(tmp_path / "bf16")[0] == "bfloat16"
    load = lambda dt: AutoModel.from_pretrained(tmp_path / "bf16", dtype=dt).eval()  # noqa: E731
    direct, cast = load(torch.float32), load_in_dtype(load, tmp_path / "bf16", torch.float32)
    a, b = direct.state_dict(), cast.state_dict()
    assert all(a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_weights_are_found_chunk_by_chunk_and_large_finite_ones_pass():
    from pipeline.serve.scoring import nonfinite_parameter

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    assert nonfinite_parameter(model, chunk=5) is None
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, but every chunk's float32 sum overflows
    assert nonfinite_parameter(model, chunk=5) is None
    with torch.no_grad():
        model[1].weight[-1, -1] = float("nan")  # in the last chunk of the last weight
    assert nonfinite_parameter(model.to(torch.bfloat16), chunk=5) == "1.weight"


def test_a_score_that_is_not_finite_is_refused_naming_the_row_and_field():
    from pipeline.serve import jsonl_lines
    from pipeline.serve import ScoreError

    good = {"id": "a", "score": 1.0, "attribute_stds": [0.5, 0.5]}
    assert jsonl_lines([good]) == ['{"id": "a", "score": 1.0, "attribute_stds": [0.5, 0.5]}\n']
    with pytest.raises(ScoreError, match=r"row 2 \(id 'b'\): attribute_stds.1 is inf"):
        jsonl_lines([good, {"id": "b", "score": 1.0, "attribute_stds": [0.5, float("inf")]}])


def test_the_first_non_finite_number_of_an_answer_is_named_by_its_path():
    from pipeline.serve import nonfinite_field

    answer = {"rewards": [0.5, 1.0], "extra_logs": {"score_std": [0.1, float("nan")]}, "transform": "mean"}
    assert nonfinite_field(answer) == ("extra_logs.score_std.1", answer["extra_logs"]["score_std"][1])
    assert nonfinite_field({"rewards": [0.5], "ok": True, "name": "x"}) == (None, None)
