"""Rating rows in the HelpSteer2 schema, and the sources they are read from (files, hub, synthetic)."""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ATTRIBUTES
from pipeline.data import (fingerprint, iter_records, load_ratings, parse_synthetic, source_kind, source_label,
                           source_stem, split_helpsteer2_prompt)
from pipeline.errors import DataError

MULTI_TURN = "What is 2+2?\n<extra_id_1>Assistant\n4.\n<extra_id_1>User\nAnd times 3?"


def hs(prompt="Hi?", response="Hello.", **ratings):
    """A HelpSteer2-schema record; ratings default to 3, pass name=None to null one, or drop=... to omit."""
    drop = ratings.pop("drop", ())
    row = {"prompt": prompt, "response": response, **{a: 3 for a in ATTRIBUTES}, **ratings}
    return {k: v for k, v in row.items() if k not in drop}


def located(path, row, field):
    """The start of a DataError message naming file, row and field."""
    where = f"{path}, row {row}" + (f", field '{field}'" if field else "")
    return re.escape(where)


# ----------------------------------------------------------------------------------------------
# Parsing


def test_split_helpsteer2_multi_turn_prompt():
    assert split_helpsteer2_prompt(MULTI_TURN) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
    ]
    assert split_helpsteer2_prompt("  one turn \n") == [{"role": "user", "content": "one turn"}]


def test_load_single_and_multi_turn(write_jsonl):
    path = write_jsonl("hs2.jsonl", [hs(helpfulness=4, verbosity=0), hs(MULTI_TURN, "36.", correctness=1)])
    rows, report = load_ratings(str(path))
    assert (report.format, report.rows_loaded, report.rows_skipped, report.empty_responses) == ("helpsteer2", 2, 0, 0)
    assert [r.id for r in rows] == ["hs2:1", "hs2:2"]
    assert rows[0].messages == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert rows[0].labels == [4.0, 3.0, 3.0, 3.0, 0.0]
    assert [m["role"] for m in rows[1].messages] == ["user", "assistant", "user", "assistant"]
    assert rows[1].messages[-1] == {"role": "assistant", "content": "36."}
    assert rows[1].labels[1] == 1.0


def test_id_column_is_used(write_jsonl):
    rows, _ = load_ratings(str(write_jsonl("a.jsonl", [{**hs(), "id": "x1"}, {**hs(), "id": 7}])))
    assert [r.id for r in rows] == ["x1", "7"]


def test_missing_or_null_rating_is_nan(write_jsonl):
    path = write_jsonl("nan.jsonl", [hs(drop=("complexity",)), hs(verbosity=None), '{"prompt": "p", "response": "r", '
                                     '"helpfulness": NaN}'])
    rows, report = load_ratings(str(path))
    assert math.isnan(rows[0].labels[3]) and not math.isnan(rows[0].labels[0])
    assert math.isnan(rows[1].labels[4])
    assert all(math.isnan(x) for x in rows[2].labels)
    assert report.rows_skipped == 0


def test_empty_response_is_kept_and_counted(write_jsonl):
    rows, report = load_ratings(str(write_jsonl("e.jsonl", [hs(response=""), hs(response=" \n"), hs()])))
    assert len(rows) == 3 and rows[0].messages[-1]["content"] == ""
    assert report.empty_responses == 2


def test_limit_keeps_first_valid_rows(write_jsonl):
    path = write_jsonl("l.jsonl", ["{bad", hs("a"), hs("b", helpfulness=9), hs("c"), hs("d")])
    rows, report = load_ratings(str(path), skip_invalid=True, limit=2)
    assert [r.messages[0]["content"] for r in rows] == ["a", "c"]
    assert (report.rows_loaded, report.rows_skipped) == (2, 2)
    assert load_ratings(str(path), skip_invalid=True, limit=0)[0] == []


# ----------------------------------------------------------------------------------------------
# File types


def test_every_file_type_gives_the_same_rows(tmp_path, write_jsonl):
    records = [hs("a"), hs(MULTI_TURN, "b", correctness=None)]
    paths = [write_jsonl("d.jsonl", records)]
    paths.append(tmp_path / "d.jsonl.gz")
    paths[-1].write_bytes(gzip.compress(paths[0].read_bytes()))
    for name, text in [("list.json", json.dumps(records)), ("data.json", json.dumps({"data": records})),
                       ("lines.json", paths[0].read_text())]:
        paths.append(tmp_path / name)
        paths[-1].write_text(text)
    paths.append(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(records), paths[-1])
    expected = load_ratings(str(paths[0]))[0]
    for path in paths[1:]:
        rows, report = load_ratings(str(path))
        assert [(r.messages, r.labels[0]) for r in rows] == [(r.messages, r.labels[0]) for r in expected], path
        assert math.isnan(rows[1].labels[1]) and report.rows_loaded == 2
        assert rows[0].id == f"{source_stem(str(path))}:1"
    assert source_stem(str(paths[1])) == "d"


def test_blank_lines_are_not_rows(write_jsonl):
    rows, report = load_ratings(str(write_jsonl("b.jsonl", [hs(), "", "  ", hs()])))
    assert [r.id for r in rows] == ["b:1", "b:4"] and report.rows_skipped == 0


# ----------------------------------------------------------------------------------------------
# Bad input: one test per kind, each naming file, row and field


@pytest.mark.parametrize(
    "record, field, message",
    [
        (hs(drop=("prompt",)), "prompt", "missing field"),
        (hs(response=None), "response", "null"),
        (hs(response=["Hello."]), "response", "expected a string, got list"),
        (hs(prompt=42), "prompt", "expected a string, got int"),
        (hs(helpfulness=5), "helpfulness", "out of range 0-4"),
        (hs(coherence=-1), "coherence", "out of range 0-4"),
        (hs(verbosity=4.5), "verbosity", "out of range 0-4"),
        (hs(correctness=True), "correctness", "must be a number from 0 to 4, got bool"),
        (hs(complexity="3"), "complexity", "must be a number from 0 to 4, got str"),
        ({**hs(), "id": [1]}, "id", "id must be a string or an integer"),
    ],
)
def test_bad_row_raises_located_error(write_jsonl, record, field, message):
    path = write_jsonl("bad.jsonl", [hs(), hs(), record])
    with pytest.raises(DataError, match=located(path, 3, field) + ".*" + re.escape(message)) as info:
        load_ratings(str(path))
    assert (info.value.path, info.value.row, info.value.field) == (str(path), 3, field)


def test_malformed_json_line(write_jsonl):
    path = write_jsonl("bad.jsonl", [hs(), '{"prompt": "p", "response": '])
    with pytest.raises(DataError, match=located(path, 2, None) + ": malformed JSON line"):
        load_ratings(str(path))


def test_json_value_that_is_not_an_object(write_jsonl):
    path = write_jsonl("bad.jsonl", [hs(), "[1, 2]"])
    with pytest.raises(DataError, match=located(path, 2, None) + ": expected a JSON object, got list"):
        load_ratings(str(path))


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(hs()).encode() + b'\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=located(path, 2, None) + r": not UTF-8 text \(byte 0xff at position 12; "
                                        "perhaps Latin-1 or Windows-1252\): re-encode the file as UTF-8"):
        load_ratings(str(path))


def test_duplicate_id(write_jsonl):
    path = write_jsonl("dup.jsonl", [{**hs(), "id": "a"}, {**hs(), "id": "a"}])
    with pytest.raises(DataError, match=located(path, 2, "id") + ".*duplicate id 'a' \\(first at row 1\\)"):
        load_ratings(str(path))


def test_skip_invalid_counts_and_keeps_errors(write_jsonl):
    lines = [hs(), "{oops", hs(helpfulness=7), hs(drop=("response",)), hs(correctness=False), hs(), "[]"]
    path = write_jsonl("mixed.jsonl", lines)
    rows, report = load_ratings(str(path), skip_invalid=True)
    assert [r.id for r in rows] == ["mixed:1", "mixed:6"]
    assert report.rows_loaded + report.rows_skipped == len(lines)
    assert [(e.row, e.field) for e in report.skipped] == [(2, None), (3, "helpfulness"), (4, "response"),
                                                          (5, "correctness"), (7, None)]
    assert "5 skipped" in report.summary()


def test_json_file_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"prompt": "a", "response": "b"}, 3]')
    with pytest.raises(DataError, match=located(path, 2, None) + ": expected a JSON object, got int"):
        load_ratings(str(path))
    path.write_text('[{"prompt": "a"')
    with pytest.raises(DataError, match=re.escape(str(path)) + ": not valid JSON"):
        load_ratings(str(path))
    path.write_text("3")
    with pytest.raises(DataError, match="expected a list of records"):
        load_ratings(str(path))


# ----------------------------------------------------------------------------------------------
# Whole-file problems: a located DataError with no row, never a raw traceback


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(str(path)) + ": file not found") as info:
        load_ratings(str(path))
    assert info.value.row is None


def test_truncated_gzip(tmp_path, write_jsonl):
    data = gzip.compress(write_jsonl("t.jsonl", [hs(prompt="x" * 50) for _ in range(200)]).read_bytes())
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(str(path)) + ": cannot read file.*truncated or corrupt") as info:
        load_ratings(str(path))
    assert info.value.row is None


def test_not_gzip(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_text(json.dumps(hs()) + "\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + ": cannot read file"):
        load_ratings(str(path))


def test_not_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(DataError, match=re.escape(str(path)) + ": not a readable parquet file") as info:
        load_ratings(str(path))
    assert info.value.row is None


def test_parquet_bad_row_is_located_by_record_index(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([hs(), hs(helpfulness=6)]), path)
    with pytest.raises(DataError, match=located(path, 2, "helpfulness")):
        load_ratings(str(path))


def test_unknown_file_type_and_directory(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type; supported: .jsonl"):
        load_ratings(str(path))
    with pytest.raises(DataError, match="not a file"):
        load_ratings(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Hub ids (the hub is unreachable here: datasets.load_dataset is replaced)


def fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_hub_id_goes_through_load_dataset(monkeypatch):
    calls = []

    def load(repo, split, revision):
        calls.append((repo, split, revision))
        return [hs(), hs(MULTI_TURN)]

    fake_datasets(monkeypatch, load)
    rows, report = load_ratings("nvidia/HelpSteer2@abc123", split="validation")
    assert calls == [("nvidia/HelpSteer2", "validation", "abc123")]
    assert [r.id for r in rows] == ["HelpSteer2-validation:1", "HelpSteer2-validation:2"]
    assert report.rows_loaded == 2


def test_unreachable_hub_is_a_data_error(monkeypatch):
    def load(repo, split, revision):
        raise ConnectionError("no network")

    fake_datasets(monkeypatch, load)
    message = "could not load hub dataset 'nvidia/HelpSteer2'.*ConnectionError: no network"
    with pytest.raises(DataError, match=message):
        load_ratings("nvidia/HelpSteer2")


def test_source_kind():
    assert source_kind("nvidia/HelpSteer2") == "hub"
    assert source_kind("nvidia/HelpSteer2@main") == "hub"
    assert source_kind("data/missing.jsonl") == "file"
    assert source_kind("./org/name") == "file"
    assert source_kind("synthetic:ratings?n=3") == "synthetic"
    assert source_label("nvidia/HelpSteer2@v2") == "nvidia/HelpSteer2"
    assert source_label("../shared/data/hh-rlhf-harmless-base-test.jsonl.gz") == "hh-rlhf-harmless-base-test"
    assert source_label("synthetic:preferences?n=3&seed=1") == "synthetic:preferences"
    with pytest.raises(DataError, match="synthetic sources have no raw records"):
        iter_records("synthetic:ratings?n=3")


# ----------------------------------------------------------------------------------------------
# Synthetic sources and fingerprints


def test_parse_synthetic():
    assert parse_synthetic("synthetic:ratings?n=100&seed=7") == ("ratings", 100, 7)
    assert parse_synthetic("synthetic:preferences?n=5") == ("preferences", 5, 0)
    for bad, message in [("synthetic:ratings", "need an integer n"), ("synthetic:ratings?n=x", "need an integer n"),
                         ("synthetic:ratings?n=0", "at least 1"), ("synthetic:other?n=3", "unknown synthetic kind"),
                         ("synthetic:ratings?n=3&sed=1", "unknown synthetic option")]:
        with pytest.raises(DataError, match=message):
            parse_synthetic(bad)


def test_synthetic_ratings():
    pytest.importorskip("pipeline.data.synthetic", reason="pipeline.data.synthetic not written yet")
    rows, report = load_ratings("synthetic:ratings?n=12&seed=3")
    assert len(rows) == 12 and report.rows_loaded == 12 and report.format == "synthetic"
    assert [r.labels for r in rows] == [r.labels for r in load_ratings("synthetic:ratings?n=12&seed=3")[0]]
    assert all(r.messages[-1]["role"] == "assistant" for r in rows)
    assert len(load_ratings("synthetic:ratings?n=12&seed=3", limit=5)[0]) == 5
    with pytest.raises(DataError, match="load it with load_preferences"):
        load_ratings("synthetic:preferences?n=3")


def test_fingerprint(write_jsonl, tmp_path):
    path = write_jsonl("f.jsonl", [hs()])
    fp = fingerprint(str(path), "train", None, None)
    assert re.fullmatch("[0-9a-f]{64}", fp)
    renamed = tmp_path / "g.jsonl"
    renamed.write_bytes(path.read_bytes())
    assert fingerprint(str(renamed)) != fp  # the stem names the rows
    path.write_text(json.dumps(hs(helpfulness=0)) + "\n")
    assert fingerprint(str(path)) != fp
    hub = fingerprint("nvidia/HelpSteer2", "train", None, None)
    assert hub == fingerprint("nvidia/HelpSteer2", "train", None, None)
    assert len({hub, fingerprint("nvidia/HelpSteer2", "validation", None, None),
                fingerprint("nvidia/HelpSteer2@v2", "train", None, None),
                fingerprint("nvidia/HelpSteer2", "train", None, 100)}) == 4
    assert fingerprint("synthetic:ratings?n=3") != fingerprint("synthetic:ratings?n=4")
    with pytest.raises(DataError, match="file not found"):
        fingerprint(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------------------------
# NeMo-Aligner's formats: SteerLM SFT rows and regression reward-model rows

STEERLM = {"system": "", "mask": "User", "dataset": "x", "conversations": [
    {"from": "User", "value": MULTI_TURN, "label": None},
    {"from": "Assistant", "value": "36.", "label": "helpfulness:4,correctness:3,quality:9,coherence:4,complexity:1,verbosity:0"}]}
NEMO = {"text": "<extra_id_0>System\nBe helpful.\n<extra_id_1>User\nWhat is 2+2?\n<extra_id_1>Assistant\n4.\n"
                "<extra_id_1>User\nAnd times 3?\n<extra_id_1>Assistant\n12.\n<extra_id_2>",
        "label": [-100, -100, -100, -100, 4, 3, -100, 2, 1]}


def test_steerlm_and_nemo_regression_rows_are_rating_rows(write_jsonl):
    rows, report = load_ratings(str(write_jsonl("steer.jsonl", [STEERLM])))
    assert report.format == "steerlm"
    assert rows[0].messages == split_helpsteer2_prompt(MULTI_TURN) + [{"role": "assistant", "content": "36."}]
    assert rows[0].labels == [4.0, 3.0, 4.0, 1.0, 0.0]  # other attribute names (quality) ignored
    rows, report = load_ratings(str(write_jsonl("nemo.jsonl", [NEMO])))
    assert report.format == "nemo-regression"
    assert rows[0].messages == [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "What is 2+2?"},
                                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And times 3?"},
                                {"role": "assistant", "content": "12."}]
    assert rows[0].labels[:2] == [4.0, 3.0] and math.isnan(rows[0].labels[2]) and rows[0].labels[3:] == [2.0, 1.0]
    named, _ = load_ratings(str(write_jsonl("n2.jsonl", [NEMO])), format="nemo-regression")
    assert named[0].labels[:2] == [4.0, 3.0]


@pytest.mark.parametrize("record, field, message", [
    ({**STEERLM, "conversations": []}, "conversations", "non-empty list"),
    ({**STEERLM, "conversations": [{"from": "Bot", "value": "x", "label": None}]}, "conversations[0].from", "unknown speaker"),
    ({**STEERLM, "conversations": STEERLM["conversations"][:1]}, "conversations[0].from", "last turn must be the Assistant"),
    ({**STEERLM, "conversations": [STEERLM["conversations"][0], {**STEERLM["conversations"][1], "label": None}]},
     "conversations[1].label", "expected the ratings"),
    ({**STEERLM, "conversations": [STEERLM["conversations"][0], {**STEERLM["conversations"][1], "label": "helpfulness:7"}]},
     "conversations[1].label.helpfulness", "out of range 0-4"),
    ({**NEMO, "label": [1, 2]}, "label", "expected 5 ratings"),
    ({**NEMO, "label": [-100] * 4 + [1, 2, "x", 3, 4]}, "label[6]", "must be a number"),
    ({**NEMO, "text": "no markers"}, "text", "text before the first turn marker"),
    ({**NEMO, "text": "<extra_id_1>User\nonly a question\n<extra_id_2>"}, "text", "last turn must be the Assistant"),
])
def test_nemo_formats_bad_rows_are_located(write_jsonl, record, field, message):
    path = write_jsonl("bad.jsonl", [record])
    fmt = "steerlm" if "conversations" in record else "nemo-regression"
    with pytest.raises(DataError, match=located(path, 1, field) + ".*" + re.escape(message)):
        load_ratings(str(path), format=fmt)


def test_unknown_rating_columns_and_format_are_clear(write_jsonl):
    with pytest.raises(DataError, match="cannot tell the rating format from the columns.*steerlm"):
        load_ratings(str(write_jsonl("odd.jsonl", [{"question": "x"}])))
    with pytest.raises(DataError, match="unknown format 'steer'; known formats: helpsteer2, steerlm"):
        load_ratings(str(write_jsonl("ok.jsonl", [STEERLM])), format="steer")


def test_a_ratings_file_without_any_rating_is_refused_and_unrated_rows_counted(write_jsonl):
    from pipeline.data import require_labels

    unrated = hs(**{a: None for a in ATTRIBUTES})
    rows, report = load_ratings(str(write_jsonl("none.jsonl", [unrated, unrated | {"helpfulness": -100}])))
    with pytest.raises(DataError, match=r"none.jsonl: none of the 2 rows has a rating"):
        require_labels(rows, report)
    rows, report = load_ratings(str(write_jsonl("some.jsonl", [unrated, hs(helpfulness=3), unrated])))
    assert require_labels(rows, report) == rows and report.unlabeled_rows == 2
    assert "warning: 2 of 3 rows have no rating at all" in report.summary()
