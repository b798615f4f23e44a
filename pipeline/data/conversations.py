"""Conversations to score, one per row -> ``Conversation``; and which kind of rows a scoring input holds.

A conversation row is either ``{"messages": [{role, content}, ...], "id"?: ...}`` (the chat-template
form, ending with the assistant turn to judge) or a row in any rating format pipeline.data.ratings reads
(HelpSteer2 ``prompt`` + ``response``, SteerLM ``conversations``, NeMo regression ``text``; any
ratings are ignored). ``synthetic:ratings?...`` sources give the generator's rating rows.
A scoring input whose rows hold ``chosen`` / ``rejected`` (any format of pipeline.data.preferences) is a
pair input instead: ``input_kind`` tells the two apart from the first row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from pipeline.data.preferences import check_ends_with_assistant, messages_from
from pipeline.data.ratings import PARSERS, detect_format, load_ratings
from pipeline.data.records import LoadReport, Message
from pipeline.data.sources import (RowError, collect, is_blank, iter_records, peek_record, record_id, source_kind,
                                   source_stem)
from pipeline.errors import DataError

PAIR_COLUMNS = ("chosen", "rejected", "reject", "conversation_input")


@dataclass
class Conversation:
    """One conversation to score; its last turn is the assistant response being judged."""

    id: str
    messages: list[Message]


def parse_conversation(record: dict, row: int, stem: str) -> tuple[Conversation, str, str | None]:
    """A ``messages`` row or a HelpSteer2 prompt/response row -> (Conversation, id, id column); RowError."""
    if "messages" in record:
        messages = check_ends_with_assistant(messages_from(record["messages"], "messages"), "messages")
    else:
        try:
            rating_messages, _ = PARSERS[detect_format(record)]
        except ValueError:
            raise RowError("messages", "expected a 'messages' list (or a rating row: HelpSteer2 'prompt' + "
                           f"'response', SteerLM 'conversations', NeMo 'text'); the row has {sorted(record)[:8]}") from None
        messages = rating_messages(record)
    row_id, column = record_id(record, ("id",), f"{stem}:{row}")
    return Conversation(row_id, messages), row_id, column


def load_conversations(source: str, *, split: str = "train", skip_invalid: bool = False,
                       limit: int | None = None) -> tuple[list[Conversation], LoadReport]:
    """Conversations from a jsonl / json / parquet file, a hub id, or ``synthetic:ratings?n=N&seed=S``."""
    if source_kind(source) == "synthetic":
        rows, report = load_ratings(source, limit=limit)
        return [Conversation(r.id, r.messages) for r in rows], report
    report = LoadReport(path=source, format="conversations")
    parse = partial(parse_conversation, stem=source_stem(source, split))
    items = collect(iter_records(source, split), source, parse, report, skip_invalid=skip_invalid,
                    limit=limit, is_empty=lambda c: is_blank(c.messages[-1]["content"]))
    return items, report


def input_kind(source: str, split: str = "train") -> str:
    """"pairs" when the first row holds chosen/rejected (or the source is synthetic preferences), else
    "conversations"."""
    if source_kind(source) == "synthetic":
        return "pairs" if source.removeprefix("synthetic:").startswith("preferences") else "conversations"
    first, records = peek_record(iter_records(source, split))
    if first is None:  # no parseable row: say why the first one is not, if there is one
        bad = next((error for _, error in records), None)
        raise bad or DataError(source, None, None, "no rows to score (the file holds no JSON rows)")
    return "pairs" if any(c in first[1] for c in PAIR_COLUMNS) else "conversations"
