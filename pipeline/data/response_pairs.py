"""Unlabelled response pairs for `urm curate --select` (what to label next) -> ``PreferencePair`` with no preference:
``chosen`` is response A and ``rejected`` response B, in the order the file gives them.

A row is ``{"prompt": str | [messages], "responses": [A, B]}`` with each response a string (the assistant's
reply) or a message list (the whole conversation, or its assistant turns when a prompt is given), and an
optional ``id``; or a labelled pair in any format pipeline.data.preferences reads (its label is ignored).
"""

from __future__ import annotations

from pipeline.data.preferences import (
    FORMATS,
    _pair,
    _prompt_prefix,
    detect_format,
    has_empty_response,
    messages_from,
    parse_pair,
    reply,
)
from pipeline.data.records import LoadReport, PreferencePair
from pipeline.data.sources import RowError, load_rows, record_id

RESPONSE_FORMATS = ("responses", *FORMATS)


def detect_response_format(record: dict) -> str:
    if "responses" in record:
        return "responses"
    try:
        return detect_format(record)
    except ValueError:
        raise ValueError(f"cannot tell the pair format from the columns {sorted(record)}: unlabelled pairs need "
                         "'prompt' + 'responses' (a list of two), or a chosen/rejected pair") from None


def parse_responses(record: dict) -> tuple[list, list]:
    """A ``prompt`` + ``responses`` row -> the two conversations (A, B)."""
    responses = record.get("responses")
    if not isinstance(responses, list) or len(responses) != 2:
        got = f"{len(responses)} items" if isinstance(responses, list) else type(responses).__name__
        raise RowError("responses", f"expected a list of two responses (strings or message lists), got {got}")
    prefix = _prompt_prefix(record)
    sides = []
    for i, response in enumerate(responses):
        if isinstance(response, str):
            sides.append(prefix + reply(response))
        else:
            sides.append(prefix + messages_from(response, f"responses[{i}]"))
    return _pair(*sides)


def parse_response_pair(record: dict, row: int, *, format: str, stem: str) -> tuple[PreferencePair, str, str | None]:
    if format != "responses":
        return parse_pair(record, row, format=format, stem=stem)
    a, b = parse_responses(record)
    pair_id, column = record_id(record, ("id",), f"{stem}:{row}")
    subset = record.get("subset")
    return PreferencePair(pair_id, a, b, subset if isinstance(subset, str) else None), pair_id, column


def load_response_pairs(source: str, *, split: str = "train", skip_invalid: bool = False,
                        limit: int | None = None) -> tuple[list[PreferencePair], LoadReport]:
    """Pairs of two responses per prompt (chosen = A, rejected = B: no preference implied)."""
    return load_rows(source, "preferences", RESPONSE_FORMATS, detect_response_format, parse_response_pair,
                     has_empty_response,
                     split=split, skip_invalid=skip_invalid, limit=limit)
