"""The synthetic HelpSteer2-schema generator: deterministic, well-formed, and labels that follow construction."""

import json
import math
import random
import re

import pytest

from pipeline import ATTRIBUTES
from pipeline.data import PreferencePair, RatingRow, split_helpsteer2_prompt
from pipeline.data.synthetic import (PAIR_WEIGHTS, SUBSETS, TURN_ASSISTANT, TURN_USER, Spec, _rating_item,
                                     helpsteer2_records, labels_for, make_preferences, make_ratings, render,
                                     sample_task, true_reward, write_helpsteer2_jsonl)

N = 1500


@pytest.fixture(scope="module")
def items():
    return [_rating_item(i, 7) for i in range(N)]


def _ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _spearman(xs, ys):
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_deterministic_and_seed_dependent():
    assert helpsteer2_records(50, 3) == helpsteer2_records(50, 3)
    assert helpsteer2_records(50, 3) != helpsteer2_records(50, 4)
    assert helpsteer2_records(20, 3) == helpsteer2_records(50, 3)[:20]  # row i does not depend on n
    assert make_ratings(30, 1) == make_ratings(30, 1)
    assert make_preferences(30, 1) == make_preferences(30, 1)
    assert make_preferences(30, 1) != make_preferences(30, 2)


def test_helpsteer2_schema(items):
    for rec, _ in items:
        assert list(rec) == ["prompt", "response", *ATTRIBUTES]
        assert isinstance(rec["prompt"], str) and rec["prompt"].strip()
        assert isinstance(rec["response"], str) and rec["response"].strip()
        for a in ATTRIBUTES:
            assert type(rec[a]) is int and 0 <= rec[a] <= 4
    # texts are diverse, and some prompts are multi-turn in HelpSteer2's own format
    assert len({rec["response"] for rec, _ in items}) > 0.95 * N
    assert len({rec["prompt"] for rec, _ in items}) > 0.8 * N
    multi = [rec["prompt"] for rec, _ in items if TURN_USER in rec["prompt"]]
    assert len(multi) > 0.05 * N
    for p in multi:
        assert p.index(TURN_ASSISTANT) < p.index(TURN_USER)


def test_each_attribute_spans_the_scale(items):
    for a in ATTRIBUTES:
        counts = {v: sum(rec[a] == v for rec, _ in items) for v in range(5)}
        assert sum(c >= 0.03 * N for c in counts.values()) >= 3, (a, counts)
    for a in ("helpfulness", "coherence", "complexity", "verbosity"):
        assert all(sum(rec[a] == v for rec, _ in items) > 0 for v in range(5)), a


def test_response_lengths_fit_a_small_cpu_budget(items):
    words = sorted(len(rec["response"].split()) for rec, _ in items)
    assert words[len(words) // 2] < 80 and words[int(0.98 * len(words))] <= 150


def test_correctness_follows_the_stated_arithmetic_answer(items):
    checked = 0
    for rec, meta in items:
        if meta["family"] != "arithmetic" or meta["spec"].kind != "answer":
            continue
        stated = re.findall(r"answer is (-?\d+)", rec["response"])
        assert len(stated) >= 1, rec["response"]
        right = stated[0] == meta["truth"]
        assert right == (rec["correctness"] >= 2), (rec, meta)
        if not right:
            assert rec["helpfulness"] <= 1
        checked += 1
    assert checked > 200


def test_wrong_answers_lower_correctness_and_helpfulness():
    rng = random.Random(0)
    for i in range(50):
        task = sample_task(rng)
        spec = Spec("answer", "correct", 4, i % 5, 2)
        for outcome in ("near_miss", "wrong"):
            bad = Spec("answer", outcome, 4, i % 5, 2)
            text, stated = render(task, bad, i)
            assert stated != task.truth and stated in text
            assert labels_for(bad)["correctness"] < labels_for(spec)["correctness"]
            assert labels_for(bad)["helpfulness"] < labels_for(spec)["helpfulness"]


def test_verbosity_increases_with_length(items):
    answers = [rec for rec, m in items if m["spec"].kind == "answer"]
    words = [len(r["response"].split()) for r in answers]
    verbosity = [r["verbosity"] for r in answers]
    assert _spearman(verbosity, words) > 0.5
    means = [sum(w for w, v in zip(words, verbosity) if v == lvl) / verbosity.count(lvl) for lvl in range(5)]
    assert means == sorted(means), means
    # same task, same content seed: more verbosity -> strictly more sentences
    rng = random.Random(1)
    for i in range(30):
        task = sample_task(rng)
        lengths = [len(render(task, Spec(verbosity=v, complexity=2), i)[0].split(". ")) for v in (0, 2, 4)]
        assert lengths == sorted(lengths) and lengths[0] < lengths[2]


def _sentences(text):
    return re.split(r"(?<=[.!?])\s+", text)


def test_shuffled_sentences_have_lower_coherence():
    rng = random.Random(2)
    for i in range(40):
        task = sample_task(rng)
        ordered, _ = render(task, Spec(coherence=4, verbosity=i % 5, complexity=i % 5), i)
        shuffled, _ = render(task, Spec(coherence=2, verbosity=i % 5, complexity=i % 5), i)
        assert sorted(_sentences(ordered)) == sorted(_sentences(shuffled))  # same content
        assert _sentences(ordered) != _sentences(shuffled)  # different order
        assert labels_for(Spec(coherence=2))["coherence"] < labels_for(Spec(coherence=4))["coherence"]
        disrupted, _ = render(task, Spec(coherence=3, verbosity=i % 5, complexity=i % 5), i)
        assert len(_sentences(disrupted)) == len(_sentences(ordered)) + 1  # one non-sequitur inserted


def test_complexity_is_the_register_of_the_explanation():
    rng = random.Random(3)
    for i in range(40):
        task = sample_task(rng)
        plain, _ = render(task, Spec(complexity=0, verbosity=2), i)
        technical, _ = render(task, Spec(complexity=4, verbosity=2), i)
        mean_len = lambda t: sum(map(len, t.split())) / len(t.split())  # noqa: E731
        assert mean_len(technical) > mean_len(plain)


def test_refusals_and_off_topic_are_unhelpful():
    for spec in (Spec("refusal", complexity=0, verbosity=0), Spec("refusal", complexity=1, verbosity=1),
                 Spec("off_topic", coherence=4, complexity=2, verbosity=2)):
        assert labels_for(spec)["helpfulness"] <= 1
    task = sample_task(random.Random(4), exclude="capital")
    other = sample_task(random.Random(5), exclude=task.family)
    text, stated = render(task, Spec("off_topic"), 0, other)
    assert stated == other.truth and text


def test_ratings_rows():
    rows = make_ratings(200, 5)
    recs = helpsteer2_records(200, 5)
    for i, (row, rec) in enumerate(zip(rows, recs)):
        assert isinstance(row, RatingRow) and row.id == f"synthetic-ratings-s5-{i}"
        assert row.labels == [float(rec[a]) for a in ATTRIBUTES]
        assert row.messages[-1] == {"role": "assistant", "content": rec["response"]}
        assert row.messages[0]["role"] == "user"
        roles = [m["role"] for m in row.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row.messages)
        assert row.messages[:-1] == split_helpsteer2_prompt(rec["prompt"])
    assert any(len(r.messages) == 4 for r in rows)


def test_preference_pairs():
    pairs = make_preferences(400, 9)
    assert {p.subset for p in pairs} == set(SUBSETS)
    for i, p in enumerate(pairs):
        assert isinstance(p, PreferencePair) and p.pair_id == f"synthetic-pairs-s9-{i}"
        assert p.chosen[:-1] == p.rejected[:-1]  # same prompt (and same earlier turns)
        assert p.chosen[-1]["role"] == p.rejected[-1]["role"] == "assistant"
        assert p.chosen[-1]["content"] != p.rejected[-1]["content"]
        assert p.margin > 0
    assert PAIR_WEIGHTS["helpfulness"] > PAIR_WEIGHTS["correctness"] > 0 > PAIR_WEIGHTS["verbosity"]


def test_preference_chosen_has_the_higher_documented_reward():
    """Rebuild each pair's two specs, check chosen = higher true_reward and margin = the difference."""
    from pipeline.data import synthetic

    for i, p in enumerate(make_preferences(100, 11)):
        key = f"pairs/11/{i}"
        rng = random.Random(f"urm-synthetic/{key}")
        subset = rng.choice(SUBSETS)
        task = sample_task(rng)
        other = sample_task(rng, exclude=task.family)
        synthetic._prompt(task, rng, key)
        a, b = synthetic._pair_specs(subset, rng)
        texts = {render(task, s, key, other)[0]: true_reward(labels_for(s)) for s in (a, b)}
        r_chosen, r_rejected = texts[p.chosen[-1]["content"]], texts[p.rejected[-1]["content"]]
        assert r_chosen > r_rejected
        assert p.margin == pytest.approx(r_chosen - r_rejected)
        if subset == "correctness":  # the right answer wins
            assert (a if true_reward(labels_for(a)) > true_reward(labels_for(b)) else b).outcome == "correct"


def test_write_helpsteer2_jsonl_round_trip(tmp_path):
    path = write_helpsteer2_jsonl(tmp_path / "sub" / "hs2.jsonl", 40, 2)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == helpsteer2_records(40, 2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["hs2.jsonl"]  # no temp file left behind
