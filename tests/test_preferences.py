"""Preference pairs: format detection, one parser per format, and every kind of bad input."""

from __future__ import annotations

import re

import pytest

from pipeline.data.preferences import FORMATS, detect_format, load_preferences, split_transcript
from pipeline.errors import DataError

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731

HH = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke."
RECORDS = {
    "conversational": {"chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")]},
    "trl-standard": {"prompt": "q", "chosen": "good", "rejected": "bad"},
    "rewardbench": {"prompt": "q", "chosen": "good", "rejected": "bad", "subset": "chat", "id": 17},
    "hh-rlhf": {"chosen": HH + "\n\nAssistant: good", "rejected": HH + "\n\nAssistant: bad"},
    "ultrafeedback": {"prompt": "q", "chosen": "good", "rejected": "bad", "source_index": 3,
                      "metadata": {"score_chosen": 8.5, "score_rejected": 6.0}},
    "rmb": {"pair_uid": "u1", "conversation_input": [{"role": "user", "content": "q", "language": "en"}],
            "chosen": {"llm_name": "m1", "answer": "good"}, "reject": {"llm_name": "m2", "answer": "bad"},
            "category_path": "Pairwise_set/Helpfulness/Chat/Discussion",
            "category_path_file": "Helpfulness/Chat/Discussion"},
}


def located(path, row, field):
    return re.escape(f"{path}, row {row}" + (f", field '{field}'" if field else ""))


def load_one(write_jsonl, record, **kw):
    pairs, report = load_preferences(str(write_jsonl("p.jsonl", [record])), **kw)
    assert len(pairs) == 1
    return pairs[0], report


# ----------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format(fmt):
    assert detect_format(RECORDS[fmt]) == fmt


def test_detect_more_shapes():
    conv_prompt = {"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}
    assert detect_format(conv_prompt) == "conversational"
    trl_uf = {"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")], "score_chosen": 9, "score_rejected": 2}
    assert detect_format(trl_uf) == "ultrafeedback"


def test_detect_unknown_lists_known_formats():
    columns = re.escape("from the columns ['answer', 'question']")
    known = ".*known formats: conversational, trl-standard, rewardbench, hh-rlhf, ultrafeedback, rmb"
    with pytest.raises(ValueError, match=columns + known):
        detect_format({"question": "q", "answer": "a"})


def test_unknown_columns_in_file_is_a_data_error(write_jsonl):
    path = write_jsonl("x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=re.escape(str(path)) + ", row 1: cannot tell the preference format"):
        load_preferences(str(path), skip_invalid=True)


def test_unknown_format_name(write_jsonl):
    with pytest.raises(DataError, match="field 'format': unknown format 'skywork'; known formats: conversational"):
        load_preferences(str(write_jsonl("x.jsonl", [RECORDS["trl-standard"]])), format="skywork")


# ----------------------------------------------------------------------------------------------
# One test per format


@pytest.mark.parametrize("fmt", ["conversational", "trl-standard", "rewardbench", "ultrafeedback", "rmb"])
def test_single_turn_formats_give_the_same_conversations(write_jsonl, fmt):
    pair, report = load_one(write_jsonl, RECORDS[fmt])
    assert report.format == fmt
    assert pair.chosen == [U("q"), A("good")] and pair.rejected == [U("q"), A("bad")]


def test_pair_ids_and_subsets(write_jsonl):
    assert load_one(write_jsonl, RECORDS["trl-standard"])[0].pair_id == "p:1"
    bench, _ = load_one(write_jsonl, RECORDS["rewardbench"])
    assert (bench.pair_id, bench.subset, bench.margin) == ("17", "chat", None)
    rmb, _ = load_one(write_jsonl, RECORDS["rmb"])
    assert (rmb.pair_id, rmb.subset) == ("u1", "Helpfulness/Chat/Discussion")


def test_format_by_name_overrides_detection(write_jsonl):
    pair, report = load_one(write_jsonl, RECORDS["rewardbench"], format="trl-standard")
    assert report.format == "trl-standard" and pair.subset == "chat"


def test_conversational_with_separate_prompt(write_jsonl):
    record = {"prompt": [{"role": "system", "content": "Be brief."}, U("q")], "chosen": [A("good")],
              "rejected": [A("bad")], "margin": 2}
    pair, _ = load_one(write_jsonl, record)
    assert pair.chosen == [{"role": "system", "content": "Be brief."}, U("q"), A("good")]
    assert pair.rejected[:-1] == pair.chosen[:-1] and pair.margin == 2.0


def test_conversational_drops_extra_message_keys(write_jsonl):
    record = {"chosen": [{**U("q"), "name": "x"}, A("a")], "rejected": [U("q"), A("b")]}
    assert load_one(write_jsonl, record)[0].chosen[0] == U("q")


def test_hh_rlhf_transcripts(write_jsonl):
    pair, report = load_one(write_jsonl, RECORDS["hh-rlhf"])
    assert report.format == "hh-rlhf"
    assert pair.chosen == [U("Hi"), A("Hello!"), U("Tell me a joke."), A("good")]
    assert pair.chosen[:-1] == pair.rejected[:-1]


def test_hh_rlhf_quirky_extra_turn_is_kept(write_jsonl):
    record = {"chosen": HH + "\n\nAssistant: good", "rejected": HH + "\n\nAssistant: bad\n\nAssistant:  more"}
    pair, _ = load_one(write_jsonl, record)
    assert pair.rejected[-2:] == [A("bad"), A("more")] and len(pair.chosen) == 4


def test_split_transcript_strips_turns():
    assert split_transcript("Human:  a \n\nAssistant:\n b\n", "chosen") == [U("a"), A("b")]


def test_rewardbench_transcript_prompt_is_split(write_jsonl):
    record = {"prompt": HH, "chosen": "good", "rejected": "bad", "subset": "anthropic_helpful"}
    pair, _ = load_one(write_jsonl, record)
    assert pair.chosen == [U("Hi"), A("Hello!"), U("Tell me a joke."), A("good")]
    # a prompt waiting for the assistant ("...\n\nAssistant:") loses that empty turn
    pair, _ = load_one(write_jsonl, {**record, "prompt": HH + "\n\nAssistant:"})
    assert pair.chosen == [U("Hi"), A("Hello!"), U("Tell me a joke."), A("good")]
    # a plain prompt that merely mentions the markers later stays one user turn
    plain = "Summarise:\n\nHuman: hi\n\nAssistant: hello"
    assert load_one(write_jsonl, {**record, "prompt": plain})[0].chosen[0] == U(plain)


def test_ultrafeedback_margin_and_message_lists(write_jsonl):
    pair, _ = load_one(write_jsonl, RECORDS["ultrafeedback"])
    assert pair.margin == 2.5
    trl = {"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")], "score_chosen": 9, "score_rejected": 2}
    pair, report = load_one(write_jsonl, trl)
    assert report.format == "ultrafeedback" and pair.margin == 7.0 and pair.chosen == [U("q"), A("a")]


def test_rmb_multi_turn(write_jsonl):
    turns = [U("q1"), A("a1"), {"role": "user", "content": "q2", "language": "de"}]
    record = {**RECORDS["rmb"], "conversation_input": turns}
    pair, _ = load_one(write_jsonl, record)
    assert [m["role"] for m in pair.chosen] == ["user", "assistant", "user", "assistant"]
    assert pair.chosen[2] == U("q2") and pair.rejected[-1] == A("bad")


def test_empty_responses_are_kept_and_counted(write_jsonl):
    rows = [{**RECORDS["trl-standard"], "chosen": ""}, {**RECORDS["trl-standard"], "rejected": "  \n"},
            {**RECORDS["trl-standard"], "chosen": "", "rejected": ""}, RECORDS["trl-standard"],
            {**RECORDS["trl-standard"], "prompt": ""}]
    pairs, report = load_preferences(str(write_jsonl("e.jsonl", rows)))
    assert len(pairs) == 5 and pairs[0].chosen[-1] == A("")
    assert report.empty_responses == 3  # pairs with an empty judged response; an empty prompt is not counted


def test_limit(write_jsonl):
    rows = [{**RECORDS["trl-standard"], "prompt": str(i)} for i in range(10)]
    pairs, report = load_preferences(str(write_jsonl("l.jsonl", rows)), limit=3)
    assert [p.chosen[0]["content"] for p in pairs] == ["0", "1", "2"] and report.rows_loaded == 3


# ----------------------------------------------------------------------------------------------
# Bad input: one test per kind


BAD = [
    ("malformed JSON", '{"prompt": "q", "chosen": ', None, "malformed JSON line", None),
    ("missing field", {"prompt": "q", "chosen": "good"}, "rejected", "missing field", "trl-standard"),
    ("message not a string", {"prompt": "q", "chosen": True, "rejected": "bad"}, "chosen",
     "expected a string, got bool", "trl-standard"),
    ("list content not a string",
     {"chosen": [U("q"), {"role": "assistant", "content": 5}], "rejected": [U("q"), A("b")]}, "chosen[1].content",
     "expected a string, got int", "conversational"),
    ("message not an object", {"chosen": [U("q"), "hi"], "rejected": [U("q"), A("b")]}, "chosen[1]",
     "a message must be an object", "conversational"),
    ("empty message list", {"chosen": [], "rejected": [U("q"), A("b")]}, "chosen",
     "expected a non-empty list", "conversational"),
    ("not ending with assistant", {"chosen": [U("q"), A("a")], "rejected": [A("a"), U("q")]}, "rejected",
     "must end with an assistant turn, not a 'user' turn", "conversational"),
    ("hh not ending with assistant", {"chosen": HH + "\n\nAssistant: a", "rejected": HH}, "rejected",
     "must end with an assistant turn", "hh-rlhf"),
    ("hh without markers", {"chosen": "just text", "rejected": HH + "\n\nAssistant: a"}, "chosen",
     "no '\\n\\nHuman:'", "hh-rlhf"),
    ("hh text before markers", {"chosen": "preface" + HH + "\n\nAssistant: a", "rejected": HH + "\n\nAssistant: b"},
     "chosen", "text before the first 'Human:' marker", "hh-rlhf"),
    ("unknown role", {"chosen": [{"role": "bot", "content": "a"}], "rejected": [A("b")]}, "chosen[0].role",
     "unknown role 'bot'; expected one of system, user, assistant", "conversational"),
    ("missing role", {"chosen": [{"content": "a"}], "rejected": [A("b")]}, "chosen[0].role", "unknown role None",
     "conversational"),
    ("rmb unknown role", {**RECORDS["rmb"], "conversation_input": [{"role": "human", "content": "q"}]},
     "conversation_input[0].role", "unknown role 'human'", "rmb"),
    ("rmb missing answer", {**RECORDS["rmb"], "reject": {"llm_name": "m"}}, "reject.answer", "missing field", "rmb"),
    ("rmb side not an object", {**RECORDS["rmb"], "chosen": "good"}, "chosen", "expected an object with an 'answer'",
     "rmb"),
    ("score not a number", {**RECORDS["ultrafeedback"], "metadata": {"score_chosen": "9", "score_rejected": 1}},
     "metadata.score_chosen", "expected a number, got str", "ultrafeedback"),
    ("score is bool", {**RECORDS["ultrafeedback"], "metadata": {"score_chosen": 9, "score_rejected": False}},
     "metadata.score_rejected", "expected a number, got bool", "ultrafeedback"),
    ("score missing", {**RECORDS["ultrafeedback"], "metadata": {"score_chosen": 9}},
     "metadata.score_rejected", "missing field", "ultrafeedback"),
    ("margin not a number", {**RECORDS["trl-standard"], "margin": "big"}, "margin", "expected a number",
     "trl-standard"),
    ("subset not a string", {**RECORDS["rewardbench"], "subset": 3}, "subset", "expected a string, got int",
     "rewardbench"),
]


@pytest.mark.parametrize("case, bad, field, message, fmt", BAD, ids=[b[0] for b in BAD])
def test_bad_row_raises_located_error(write_jsonl, case, bad, field, message, fmt):
    path = write_jsonl("bad.jsonl", [RECORDS[fmt or "trl-standard"], bad])
    with pytest.raises(DataError, match=located(path, 2, field) + ": .*" + re.escape(message)) as info:
        load_preferences(str(path), format=fmt)
    assert (info.value.path, info.value.row, info.value.field) == (str(path), 2, field)


def test_duplicate_pair_id(write_jsonl):
    path = write_jsonl("dup.jsonl", [RECORDS["rmb"], RECORDS["rmb"]])
    with pytest.raises(DataError, match=located(path, 2, "pair_uid") + ".*duplicate id 'u1'"):
        load_preferences(str(path))


def test_skip_invalid_counts_every_kind(write_jsonl):
    good = RECORDS["trl-standard"]
    lines = [
        "{not json", good, {"prompt": "q", "chosen": "a"}, {**good, "chosen": 1.5}, good, {**good, "margin": True},
        "3", {**good, "id": "x"}, {**good, "id": "x"},
    ]
    path = write_jsonl("mixed.jsonl", lines)
    pairs, report = load_preferences(str(path), skip_invalid=True)
    assert report.format == "trl-standard"  # detected from the first parseable record
    assert [p.pair_id for p in pairs] == ["mixed:2", "mixed:5", "x"]
    assert report.rows_loaded + report.rows_skipped == len(lines)
    assert [(e.row, e.field) for e in report.skipped] == [(1, None), (3, "rejected"), (4, "chosen"), (6, "margin"),
                                                          (7, None), (9, "id")]
    with pytest.raises(DataError, match=located(path, 1, None)):
        load_preferences(str(path))


def test_empty_file(write_jsonl):
    pairs, report = load_preferences(str(write_jsonl("empty.jsonl", [])))
    assert pairs == [] and report.rows_loaded == 0


def test_synthetic_preferences():
    pytest.importorskip("pipeline.data.synthetic", reason="pipeline.data.synthetic not written yet")
    pairs, report = load_preferences("synthetic:preferences?n=8&seed=1", limit=5)
    assert len(pairs) == 5 and report.format == "synthetic" and report.rows_loaded == 5
    assert all(p.chosen[-1]["role"] == p.rejected[-1]["role"] == "assistant" for p in pairs)
    with pytest.raises(DataError, match="load it with load_ratings"):
        load_preferences("synthetic:ratings?n=3")


# ----------------------------------------------------------------------------------------------
# Pairs without signal, a byte-order mark, a missing path


def test_identical_pairs_are_dropped_and_counted_and_a_file_of_nothing_else_refused(write_jsonl):
    from pipeline.data import drop_identical

    same = {"prompt": "q", "chosen": "same", "rejected": "same"}
    rows = [RECORDS["trl-standard"], same, {**same, "id": "twin"}, RECORDS["trl-standard"] | {"id": "x"}]
    pairs, report = load_preferences(str(write_jsonl("p.jsonl", rows)))
    assert len(pairs) == 4  # the loader reads what is there (`urm score` scores such a pair: p = 0.5)
    kept = drop_identical(pairs, report)
    assert [p.pair_id for p in kept] == ["p:1", "x"] and report.identical_pairs == ["p:2", "twin"]
    assert "warning: 2 of 4 pairs dropped: their chosen is identical to their rejected" in report.summary()
    pairs, report = load_preferences(str(write_jsonl("same.jsonl", [same, same | {"id": "b"}])))
    with pytest.raises(DataError, match=r"same.jsonl: all 2 pairs have chosen identical to rejected"):
        drop_identical(pairs, report)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_read(tmp_path, suffix):
    import json

    rows = [RECORDS["trl-standard"] | {"id": str(i)} for i in range(3)]
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # what Notepad and Excel save
    pairs, report = load_preferences(str(path))
    assert [p.pair_id for p in pairs] == ["0", "1", "2"] and report.rows_skipped == 0


def test_a_missing_path_is_a_missing_file_whatever_its_ending(tmp_path, monkeypatch):
    from pipeline.data import source_kind

    monkeypatch.chdir(tmp_path)
    for missing in ("data/nope.txt", "data/nope.csv", "nope/pairs.jsonl", "a/b/c", "./x", "nope.txt"):
        assert source_kind(missing) == "file", missing
        with pytest.raises(DataError, match=re.escape(missing) + ": file not found"):
            load_preferences(missing)
    for hub in ("org/name", "allenai/tulu-2.5-preference-data", "org/name@v1.0"):  # dots in a hub name stay
        assert source_kind(hub) == "hub", hub
