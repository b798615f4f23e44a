"""Scoring a file: the conversations it holds, the length rule, and the scores written as JSON lines.

``urm score`` and ``urm curate`` read their input, render it, drop what is too long and write their rows with
these functions: one reading and one writing rule for both. Rows are written atomically to a file
(``pipeline.atomic``) or to stdout, and a non-finite number in a row is refused naming the row and field.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from pipeline.atomic import WRITE_CAUSES, WriteError, write_text
from pipeline.model import rewards_of
from pipeline.serve.scoring import ScoreError, nonfinite_field, pair_probabilities, row_scores

logger = logging.getLogger(__name__)


def load_input(source: str, reading):
    """(kind, items, report): conversations, or preference pairs in any format pipeline.data.preferences reads."""
    from pipeline.data import input_kind, load_conversations, load_preferences

    kind = "pairs" if reading.format else input_kind(source)
    if kind == "pairs":
        items, report = load_preferences(source, format=reading.format, skip_invalid=reading.skip_invalid,
                                         limit=reading.limit)
    else:
        items, report = load_conversations(source, skip_invalid=reading.skip_invalid, limit=reading.limit)
    if not items:
        raise ScoreError(f"{source}: no rows to score ({report.rows_skipped} skipped)")
    return kind, items, report


def flatten(kind: str, items) -> list[list[dict]]:
    """The conversations to embed: one per conversation, or chosen then rejected per pair."""
    if kind == "pairs":
        return [conv for p in items for conv in (p.chosen, p.rejected)]
    return [c.messages for c in items]


def output_rows(kind: str, items, out: dict[str, np.ndarray], names: list[str], temperature: dict | None = None,
                reward: str = "mean", risk: float = 1.0):
    """One JSON-ready dict per conversation or pair, in input order (pairs' probabilities at ``temperature``),
    each conversation with its ``reward`` under the transform."""
    given = rewards_of(out, reward, risk).tolist()

    def row(i: int) -> dict:
        return {**row_scores(out, i, names), "reward": given[i]}

    if kind == "conversations":
        for i, conv in enumerate(items):
            yield {"id": conv.id, **row(i)}
        return
    for j, pair in enumerate(items):
        chosen, rejected = row(2 * j), row(2 * j + 1)
        yield {"id": pair.pair_id, "subset": pair.subset, "chosen": chosen, "rejected": rejected,
               **pair_probabilities(chosen, rejected, temperature)}


def within_length(kind: str, items, ids: list[list[int]], limit: int, hint: str = "--max-length raises the limit"):
    """Drop (and count) the conversations longer than ``limit`` tokens, a pair with either side whole, as
    extraction does: the heads never saw such lengths (and the backbone may not fit them)."""
    from pipeline.features import keep_mask

    keep = keep_mask(np.array([len(x) for x in ids]), limit, paired=kind == "pairs")
    if keep.all():
        return items, ids, 0
    per_item = keep[0::2] if kind == "pairs" else keep
    dropped = [item for item, k in zip(items, per_item) if not k]
    names = [getattr(item, "pair_id", None) or item.id for item in dropped[:3]]
    if len(dropped) == len(items):
        raise ScoreError(f"all {len(items)} rows are longer than max_length={limit} tokens: nothing to score; {hint}")
    logger.warning(f"dropped {len(dropped)} {kind} longer than max_length={limit} tokens (e.g. "
                   f"{', '.join(map(str, names))}); {hint}")
    return [i for i, k in zip(items, per_item) if k], [x for x, k in zip(ids, keep) if k], len(dropped)


def write_jsonl(rows, output: str | None) -> int:
    """Write rows to ``output`` atomically, or to stdout when None; returns how many."""
    lines = jsonl_lines(rows)
    if output is None:
        write_stdout(lines)
    else:
        write_text(output, "".join(lines))
    return len(lines)


def write_stdout(lines: list[str]) -> None:
    """``lines`` to stdout; a stdout that cannot take them (a full disk, a closed pipe) is a ``WriteError`` saying
    so, and stdout is pointed at /dev/null so that Python's flush at exit adds no second message."""
    try:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        why = ("its reader closed it before every row was written (a pipe into `head`?)" if e.errno == errno.EPIPE
               else WRITE_CAUSES.get(e.errno, e.strerror or type(e).__name__))
        raise WriteError(f"cannot write the scores to stdout: {why}") from None


def jsonl_lines(rows) -> list[str]:
    """Rows as JSON lines. A non-finite number is refused, naming the row and the field: it is the model's fault on
    that input (a sigma head that overflows there), never a value to pass on."""
    lines = []
    for i, row in enumerate(rows):
        try:
            lines.append(json.dumps(row, allow_nan=False) + "\n")
        except ValueError:
            field, value = nonfinite_field(row)
            raise ScoreError(f"row {i + 1} (id {row.get('id')!r}): {field} is {value}: the model gave a number that is "
                             "not finite for it, so nothing was written. Its heads overflow on this input (a sigma "
                             "fitted on too few rows?): check heads.json's value_head.val, retrain on more rows") from None
    return lines


def earlier_scores(path: Path) -> bool:
    """Whether the file at ``path`` is an earlier `urm score` output: its first line a JSON object with an ``id`` and a
    ``score`` (a conversation) or ``chosen`` (a pair). Anything else there is the user's, replaced only with
    --overwrite (``pipeline.outputs``)."""
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "id" in first and ("score" in first or "chosen" in first)
