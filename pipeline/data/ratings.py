"""Rows rated on HelpSteer2's five attributes -> ``RatingRow``: multi-turn prompts split into turns, the
five 0-4 ratings checked (NaN where a rating is missing, null or -100).

Formats (``FORMATS``; ``detect_format`` picks one from the first record's columns):
  helpsteer2       ``prompt`` (str; later turns follow ``<extra_id_1>Assistant`` / ``<extra_id_1>User``
                   markers), ``response`` (the judged assistant turn), ``helpfulness``, ``correctness``,
                   ``coherence``, ``complexity``, ``verbosity`` (numbers 0-4), optional ``id``
  steerlm          NeMo-Aligner's SteerLM SFT format: ``system``, ``conversations`` = [{``from``: "User" |
                   "Assistant", ``value``, ``label``}], the judged turn the last (an Assistant's) with
                   ``label`` "helpfulness:4,correctness:4,..." (other attribute names there are ignored);
                   a User ``value`` may hold earlier turns joined by the same markers
  nemo-regression  NeMo-Aligner's regression reward-model format: ``text`` = "<extra_id_0>System\n...
                   <extra_id_1>User\n...<extra_id_1>Assistant\n...<extra_id_2>", ``label`` = the five
                   ratings, or nine whose last five are HelpSteer2's (-100 = missing)
A non-empty system prompt becomes a system turn. ``LoadReport.empty_responses`` counts rows whose
response is empty or whitespace only (kept). ``require_labels`` (what `urm extract` applies) counts the rows
with no rating at all and refuses a file of nothing else.
"""

from __future__ import annotations

import math
from numbers import Real

from pipeline import ATTRIBUTES
from pipeline.data.nemo_turns import LABEL_MARKER, SYSTEM_MARKER, TURN_MARKER, split_helpsteer2_prompt
from pipeline.data.records import LoadReport, Message, RatingRow
from pipeline.data.sources import RowError, is_blank, load_rows, record_id, require_text
from pipeline.errors import DataError

FORMATS = ("helpsteer2", "steerlm", "nemo-regression")
RATING_MIN, RATING_MAX = 0.0, 4.0
MISSING = -100  # NeMo-Aligner's "no label here"
STEERLM_ROLES = {"user": "user", "assistant": "assistant"}


def parse_rating(value, field: str) -> float:
    """A 0-4 number -> float; missing, null, NaN or -100 -> NaN; anything else (bool, text, out of range) -> RowError."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RowError(field, f"rating must be a number from 0 to 4, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or value == MISSING:
        return math.nan
    if not RATING_MIN <= value <= RATING_MAX:
        raise RowError(field, f"rating {value:g} is out of range 0-4")
    return value


def detect_format(record: dict) -> str:
    """The rating format of a record, from its columns."""
    if "conversations" in record:
        return "steerlm"
    if "text" in record and "label" in record:
        return "nemo-regression"
    if "prompt" in record and "response" in record:
        return "helpsteer2"
    raise ValueError(f"cannot tell the rating format from the columns {sorted(record)[:8]}; known formats: "
                     f"{', '.join(FORMATS)} (HelpSteer2 prompt/response + five ratings, SteerLM conversations "
                     "with labels, NeMo regression text + label); pass the format by name if the columns are right")


def with_system(system, field: str) -> list[Message]:
    """A system turn for a non-empty system prompt, else none."""
    if system is None:
        return []
    if not isinstance(system, str):
        raise RowError(field, f"expected a string, got {type(system).__name__}")
    return [{"role": "system", "content": system.strip()}] if system.strip() else []


def helpsteer2_messages(record: dict) -> list[Message]:
    messages = split_helpsteer2_prompt(require_text(record, "prompt"))
    return messages + [{"role": "assistant", "content": require_text(record, "response")}]


def helpsteer2_labels(record: dict) -> list[float]:
    return [parse_rating(record.get(name), name) for name in ATTRIBUTES]


def steerlm_turns(record: dict) -> list:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("conversations", f"expected a non-empty list of {{from, value, label}} turns, got {turns!r:.60}")
    return turns


def steerlm_messages(record: dict) -> list[Message]:
    messages = with_system(record.get("system"), "system")
    turns = steerlm_turns(record)
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowError(field, f"a turn must be an object with from and value, got {type(turn).__name__}")
        role = STEERLM_ROLES.get(str(turn.get("from")).lower())
        if role is None:
            raise RowError(f"{field}.from", f"unknown speaker {turn.get('from')!r}; expected User or Assistant")
        value = require_text(turn, "value", f"{field}.value")
        messages += split_helpsteer2_prompt(value) if role == "user" else [{"role": role, "content": value}]
    if messages[-1]["role"] != "assistant":
        raise RowError(f"conversations[{len(turns) - 1}].from", "the last turn must be the Assistant's (the judged response)")
    return messages


def steerlm_labels(record: dict) -> list[float]:
    """The last turn's "helpfulness:4,correctness:3,..." -> the five ratings (NaN for one not named)."""
    turns = steerlm_turns(record)
    field = f"conversations[{len(turns) - 1}].label"
    label = turns[-1].get("label") if isinstance(turns[-1], dict) else None
    if not isinstance(label, str) or not label.strip():
        raise RowError(field, f"expected the ratings as 'helpfulness:4,correctness:3,...', got {label!r}")
    values = {}
    for item in label.split(","):
        name, sep, value = item.partition(":")
        name = name.strip()
        if not sep or not name:
            raise RowError(field, f"{item!r} is not name:value")
        if name in ATTRIBUTES:
            try:
                number = float(value)
            except ValueError:
                raise RowError(f"{field}.{name}", f"rating must be a number from 0 to 4, got {value!r}") from None
            values[name] = parse_rating(number, f"{field}.{name}")
    if not values:
        raise RowError(field, f"names none of {', '.join(ATTRIBUTES)}: {label!r}")
    return [values.get(name, math.nan) for name in ATTRIBUTES]


def nemo_messages(record: dict) -> list[Message]:
    text = require_text(record, "text")
    head = text.split(LABEL_MARKER)[0]  # the judged turn ends where the attribute labels would start
    before, sep, rest = head.partition(SYSTEM_MARKER)
    system = ""
    if sep:
        system, marker, rest = rest.partition("<extra_id_1>")
        rest = marker + rest
    else:
        before, rest = "", head
    parts = TURN_MARKER.split(rest)
    if before.strip() or parts[0].strip():
        raise RowError("text", f"text before the first turn marker: {(before or parts[0])[:40]!r}")
    if len(parts) < 3:
        raise RowError("text", "expected <extra_id_1>User / <extra_id_1>Assistant turns")
    messages = with_system(system, "text") + [{"role": parts[i].lower(), "content": parts[i + 1].strip()}
                                               for i in range(1, len(parts), 2)]
    if messages[-1]["role"] != "assistant":
        raise RowError("text", "the last turn must be the Assistant's (the judged response)")
    return messages


def nemo_labels(record: dict) -> list[float]:
    label = record.get("label")
    if not isinstance(label, list) or len(label) not in (len(ATTRIBUTES), 4 + len(ATTRIBUTES)):
        raise RowError("label", f"expected {len(ATTRIBUTES)} ratings (or 9, the last five HelpSteer2's), "
                       f"got {label!r:.80}")
    return [parse_rating(v, f"label[{i}]") for i, v in enumerate(label)][-len(ATTRIBUTES):]


# format -> (the conversation, its five ratings); `urm score` reads the conversation alone
PARSERS = {"helpsteer2": (helpsteer2_messages, helpsteer2_labels), "steerlm": (steerlm_messages, steerlm_labels),
           "nemo-regression": (nemo_messages, nemo_labels)}


def parse_rating_row(record: dict, row: int, *, stem: str, format: str = "helpsteer2") -> tuple[RatingRow, str,
                                                                                                str | None]:
    """One record -> (RatingRow, id, id column); raises RowError."""
    messages, labels = (parse(record) for parse in PARSERS[format])
    row_id, column = record_id(record, ("id",), f"{stem}:{row}")
    return RatingRow(id=row_id, messages=messages, labels=labels), row_id, column


def load_ratings(
    source: str, *, format: str | None = None, split: str = "train", skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[RatingRow], LoadReport]:
    """Rating rows from a local file, a hub id (e.g. ``nvidia/HelpSteer2``) or ``synthetic:ratings?n=N&seed=S``.

    ``format`` is one of ``FORMATS``, or None to detect it from the first record's columns.
    """
    return load_rows(source, "ratings", FORMATS, detect_format, parse_rating_row, _empty_response, format=format,
                     split=split, skip_invalid=skip_invalid, limit=limit)


def require_labels(rows: list[RatingRow], report: LoadReport) -> list[RatingRow]:
    """``rows``, with the rows that have no rating at all counted in ``report.unlabeled_rows`` (kept: their labels
    are missing ones); ``DataError`` when no row has any rating, so the file holds nothing to learn from."""
    report.unlabeled_rows = sum(all(math.isnan(v) for v in row.labels) for row in rows)
    if rows and report.unlabeled_rows == len(rows):
        raise DataError(report.path, None, None, f"none of the {len(rows)} rows has a rating (every one of "
                        f"{', '.join(ATTRIBUTES)} is missing, null or -100): a ratings dataset needs labels "
                        "(for chosen/rejected pairs use --kind preferences)")
    return rows


def _empty_response(row: RatingRow) -> bool:
    return is_blank(row.messages[-1]["content"])
