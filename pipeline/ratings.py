"""HelpSteer2-schema rating rows -> ``RatingRow``: multi-turn prompts split into turns, the five 0-4
ratings checked (NaN where a rating is missing or null).

Schema: ``prompt`` (str; later turns follow ``<extra_id_1>Assistant`` / ``<extra_id_1>User`` markers),
``response`` (str, the judged assistant turn), ``helpfulness``, ``correctness``, ``coherence``,
``complexity``, ``verbosity`` (numbers 0-4), optional ``id``. ``LoadReport.empty_responses`` counts
rows whose response is empty or whitespace only (kept).
"""

from __future__ import annotations

import math
import re
from functools import partial
from numbers import Real

from pipeline import ATTRIBUTES
from pipeline.records import LoadReport, Message, RatingRow
from pipeline.sources import (
    RowError,
    collect,
    is_blank,
    iter_records,
    record_id,
    require_text,
    source_kind,
    source_stem,
    synthetic_items,
)

RATING_MIN, RATING_MAX = 0.0, 4.0
TURN_MARKER = re.compile(r"<extra_id_1>(User|Assistant)")


def split_helpsteer2_prompt(prompt: str) -> list[Message]:
    """``"q1\\n<extra_id_1>Assistant\\na1\\n<extra_id_1>User\\nq2"`` -> user/assistant/user turns, each stripped."""
    parts = TURN_MARKER.split(prompt)
    turns = [{"role": "user", "content": parts[0].strip()}]
    if len(parts) > 1 and not turns[0]["content"]:
        turns = []  # the prompt opens with a marker
    for i in range(1, len(parts), 2):
        turns.append({"role": parts[i].lower(), "content": parts[i + 1].strip()})
    return turns


def parse_rating(value, field: str) -> float:
    """A 0-4 number -> float; missing, null or NaN -> NaN; anything else (bool, text, out of range) -> RowError."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RowError(field, f"rating must be a number from 0 to 4, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        return math.nan
    if not RATING_MIN <= value <= RATING_MAX:
        raise RowError(field, f"rating {value:g} is out of range 0-4")
    return value


def parse_rating_row(record: dict, row: int, stem: str) -> tuple[RatingRow, str, str | None]:
    """One HelpSteer2 record -> (RatingRow, id, id column); raises RowError."""
    messages = split_helpsteer2_prompt(require_text(record, "prompt"))
    messages.append({"role": "assistant", "content": require_text(record, "response")})
    labels = [parse_rating(record.get(name), name) for name in ATTRIBUTES]
    row_id, column = record_id(record, ("id",), f"{stem}:{row}")
    return RatingRow(id=row_id, messages=messages, labels=labels), row_id, column


def load_ratings(
    source: str, *, split: str = "train", skip_invalid: bool = False, limit: int | None = None
) -> tuple[list[RatingRow], LoadReport]:
    """Rating rows from a local file, a hub id (e.g. ``nvidia/HelpSteer2``) or ``synthetic:ratings?n=N&seed=S``."""
    if source_kind(source) == "synthetic":
        return _synthetic(source, limit)
    report = LoadReport(path=source, format="helpsteer2")
    parse = partial(parse_rating_row, stem=source_stem(source, split))
    rows = collect(iter_records(source, split), source, parse, report,
                   skip_invalid=skip_invalid, limit=limit, is_empty=_empty_response)
    return rows, report


def _empty_response(row: RatingRow) -> bool:
    return is_blank(row.messages[-1]["content"])


def _synthetic(source: str, limit: int | None) -> tuple[list[RatingRow], LoadReport]:
    rows = synthetic_items(source, "ratings", limit)
    report = LoadReport(path=source, format="synthetic", rows_loaded=len(rows),
                        empty_responses=sum(map(_empty_response, rows)))
    return rows, report
