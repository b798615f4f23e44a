"""The loaders on the real preference files in ../shared/data: every file loads, with the counts its README states."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import pytest

from pipeline.data import fingerprint, load_preferences

pytestmark = pytest.mark.shared_data

# file -> (format detected, rows = lines in the file per the README, pairs with an empty response)
EXPECTED = {
    "hh-rlhf-harmless-base-test.jsonl.gz": ("hh-rlhf", 2312, 4),
    "ultrafeedback-binarized-sample-train.jsonl": ("ultrafeedback", 1000, 2),
    "ultrafeedback-binarized-sample-eval.jsonl": ("ultrafeedback", 200, 0),
    "rmb-pairwise.jsonl": ("rmb", 14543, 2),
    "anthropic-helpful-subset.jsonl": ("rewardbench", 1137, 0),
    "pandalm-test.jsonl": ("rewardbench", 894, 52),
}
# Real rows rated on the five HelpSteer attributes, in NeMo-Aligner's SteerLM and regression-RM formats
# file -> (format detected, rows = lines, rows whose prompt holds earlier turns)
RATING_FILES = {"steerlm-attributes-sample512.jsonl": ("steerlm", 512, 329),
                "nemo-regression-rm-sample8.jsonl": ("nemo-regression", 8, 0)}


@lru_cache(maxsize=None)
def load(path: Path):
    return load_preferences(str(path))


def blank(message) -> bool:
    return not message["content"].strip()


def line_count(path: Path) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return sum(1 for _ in fh)


def test_every_file_is_expected(shared_data):
    files = {p.name for p in shared_data.iterdir() if p.name != "README.md"}
    assert files == set(EXPECTED) | set(RATING_FILES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_file_loads_with_readme_counts(shared_data, name):
    fmt, rows, empty = EXPECTED[name]
    pairs, report = load(shared_data / name)
    assert report.format == fmt
    assert report.rows_loaded + report.rows_skipped == rows == line_count(shared_data / name)
    assert (report.rows_loaded, report.rows_skipped, report.empty_responses) == (rows, 0, empty)
    assert len(pairs) == rows
    assert len({p.pair_id for p in pairs}) == rows
    for pair in pairs:
        assert pair.chosen[-1]["role"] == pair.rejected[-1]["role"] == "assistant"
        messages = pair.chosen + pair.rejected
        assert all(isinstance(m["content"], str) and set(m) == {"role", "content"} for m in messages)


def test_pandalm_empty_responses_are_kept(shared_data):
    pairs, _ = load(shared_data / "pandalm-test.jsonl")
    assert sum(blank(p.rejected[-1]) for p in pairs) == 51
    assert sum(blank(p.chosen[-1]) for p in pairs) == 1
    # "True"/"False" answers are strings, not booleans
    assert any(p.chosen[-1]["content"] in ("True", "False") for p in pairs)
    assert len({p.subset for p in pairs}) == 49 and all(p.subset.startswith("pandalm-") for p in pairs)
    assert pairs[0].pair_id == "pandalm-test:1" and pairs[0].chosen[0]["role"] == "user"


def test_ultrafeedback_margin_and_empties(shared_data):
    pairs, _ = load(shared_data / "ultrafeedback-binarized-sample-train.jsonl")
    first = pairs[0]
    assert first.margin == 9.0 - 8.0
    assert first.chosen[0] == {"role": "user", "content": "how to cook t-bone in the oven"}
    assert first.chosen[:-1] == first.rejected[:-1] and len(first.chosen) == 2
    assert all(p.margin >= 0 for p in pairs)
    assert sum(p.margin == 0 for p in pairs) == 111  # tied scores upstream
    assert sum(blank(p.chosen[-1]) for p in pairs) == 1
    assert sum(blank(p.rejected[-1]) for p in pairs) == 1


def test_hh_rlhf_shared_prefix(shared_data):
    pairs, _ = load(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz")
    normal = [p for p in pairs if p.chosen[:-1] == p.rejected[:-1]]
    assert len(normal) == 2312 - 5  # 5 upstream pairs carry an extra assistant turn on one side
    quirky = [p for p in pairs if p.chosen[:-1] != p.rejected[:-1]]
    assert sorted((len(p.chosen), len(p.rejected)) for p in quirky) == [(2, 3), (5, 4), (5, 4), (5, 4), (11, 10)]
    first = pairs[0]
    assert first.chosen[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert [m["role"] for m in first.chosen] == ["user", "assistant"] * (len(first.chosen) // 2)
    assert first.chosen[-1]["content"].startswith("No, sorry!")
    assert not any(m["content"] != m["content"].strip() for m in first.chosen + first.rejected)
    # the 4 pairs whose chosen response is a lone space: empty once split, kept
    assert sum(blank(p.chosen[-1]) for p in pairs) == 4


def test_rmb_multi_turn_and_subsets(shared_data):
    pairs, _ = load(shared_data / "rmb-pairwise.jsonl")
    multi = [p for p in pairs if len(p.chosen) > 2]
    assert len(multi) == 2036
    for pair in multi:
        roles = [m["role"] for m in pair.chosen]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert pair.chosen[:-1] == pair.rejected[:-1]
    assert pairs[0].pair_id == "15089" and pairs[0].subset == "Harmlessness/S1"
    assert {p.subset.split("/")[0] for p in pairs} == {"Harmlessness", "Helpfulness"}
    assert sum(blank(p.rejected[-1]) for p in pairs) == 2  # whitespace-only answers
    assert sum(any(blank(m) for m in p.chosen[:-1]) for p in pairs) == 5  # empty user turns, kept


def test_anthropic_helpful_prompt_split_into_turns(shared_data):
    pairs, _ = load(shared_data / "anthropic-helpful-subset.jsonl")
    first = pairs[0]
    assert [m["role"] for m in first.chosen] == ["user", "assistant", "user", "assistant"]
    assert first.chosen[0]["content"].startswith("I am trying to figure out a way to ask out")
    assert first.chosen[1]["content"] == "Is there any reason why your friends are so dead set against this plan?"
    assert first.chosen[-1]["content"].startswith("If you don’t mind me asking")
    assert all(p.chosen[:-1] == p.rejected[:-1] and p.subset == "anthropic_helpful" for p in pairs)
    assert not any("Human:" in m["content"] for p in pairs for m in p.chosen[:-1])


def test_limit_keeps_first_rows(shared_data):
    pairs, report = load_preferences(str(shared_data / "rmb-pairwise.jsonl"), limit=10)
    assert [p.pair_id for p in pairs] == [p.pair_id for p in load(shared_data / "rmb-pairwise.jsonl")[0][:10]]
    assert report.rows_loaded == 10


def test_fingerprint_of_real_file_is_stable_and_content_based(shared_data, tmp_path):
    src = shared_data / "pandalm-test.jsonl"
    fp = fingerprint(str(src), "train", None, None)
    assert fp == fingerprint(str(src), "test", None, None)  # split does not apply to a local file
    assert fp != fingerprint(str(src), "train", "rewardbench", None)
    assert fp != fingerprint(str(src), "train", None, 10)
    copy = tmp_path / src.name
    copy.write_bytes(src.read_bytes())
    assert fingerprint(str(copy)) == fp
    copy.write_bytes(src.read_bytes() + b"\n")
    assert fingerprint(str(copy)) != fp


@pytest.mark.parametrize("name", sorted(RATING_FILES))
def test_rating_file_loads_with_readme_counts(shared_data, name):
    from pipeline import ATTRIBUTES
    from pipeline.data import load_ratings

    fmt, rows, multi_turn = RATING_FILES[name]
    got, report = load_ratings(str(shared_data / name))
    assert (report.format, report.rows_loaded, report.rows_skipped) == (fmt, rows, 0) and rows == line_count(shared_data / name)
    assert all(r.messages[-1]["role"] == "assistant" and len(r.labels) == len(ATTRIBUTES) for r in got)
    assert sum(len([m for m in r.messages if m["role"] == "user"]) > 1 for r in got) == multi_turn
    labels = [r.labels for r in got]
    assert all(0 <= v <= 4 for row in labels for v in row)  # every rating present, in range
    if fmt == "steerlm":  # the README's skew: coherence is 4 in 502 of 512 rows
        assert sum(row[ATTRIBUTES.index("coherence")] == 4 for row in labels) == 502
    else:  # NeMo's first four labels are -100 (missing); the last five, HelpSteer2's, are all there
        assert got[0].labels == [4.0, 4.0, 4.0, 3.0, 2.0] and got[0].messages[0]["role"] == "system"
