"""Every pairwise preference format -> ``PreferencePair``: format detection and one parser per format.

Formats (``FORMATS``; ``detect_format`` picks one from the first record's columns):
  conversational  ``chosen`` / ``rejected`` message lists (Skywork-Reward-Preference, TRL conversational),
                  optionally with a ``prompt`` message list (or string) prepended to both
  trl-standard    ``prompt`` / ``chosen`` / ``rejected`` strings
  rewardbench     the same plus ``subset`` (RewardBench, its prior sets, PandaLM)
  hh-rlhf         ``chosen`` / ``rejected`` whole transcripts with ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns
  ultrafeedback   ``prompt`` + ``chosen`` / ``rejected`` (strings or message lists incl. the user turn) and
                  ``score_chosen`` / ``score_rejected`` (top level or under ``metadata``): margin = their difference
  rmb             RMB pairwise: ``conversation_input`` messages, ``chosen.answer``, ``reject.answer``,
                  ``pair_uid``, ``category_path``

A string prompt that opens with ``Human:`` (a flattened hh-rlhf transcript, as in RewardBench's
anthropic_helpful) is split into turns too. Transcript turns are stripped of surrounding whitespace;
other text is kept as it is. Both conversations of a pair hold the whole dialogue and end with an
assistant turn; ``chosen[:-1] == rejected[:-1]`` for well-formed pairs (a few upstream hh-rlhf pairs
carry an extra turn and are kept as they are). Consecutive turns of the same role are kept.

``LoadReport.empty_responses`` counts pairs whose chosen or rejected response (the last turn) is empty
or whitespace only; such pairs are kept. A pair whose chosen is identical to its rejected carries no
preference: ``drop_identical`` (what `urm extract` applies) drops and counts them, and refuses a file of
nothing else. Empty turns earlier in a conversation are kept, not counted.
Pair ids: an ``id`` column (``pair_uid`` for RMB), else ``<file stem>:<row>``.
"""

from __future__ import annotations

import math
import re
from numbers import Real

from pipeline.data.records import LoadReport, Message, PreferencePair
from pipeline.data.sources import RowError, is_blank, load_rows, record_id, require_text
from pipeline.errors import DataError

FORMATS = ("conversational", "trl-standard", "rewardbench", "hh-rlhf", "ultrafeedback", "rmb")
ROLES = ("system", "user", "assistant")
HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
ID_COLUMNS = {"rmb": ("id", "pair_uid")}


# ----------------------------------------------------------------------------------------------
# Format detection


def detect_format(record: dict) -> str:
    """The format name for a record, from its columns (and whether ``chosen`` is text or messages)."""
    if "conversation_input" in record and "reject" in record:
        return "rmb"
    if "chosen" in record and "rejected" in record:
        if _has_scores(record):
            return "ultrafeedback"
        if isinstance(record["chosen"], list):
            return "conversational"
        if "prompt" not in record:
            return "hh-rlhf"
        return "rewardbench" if "subset" in record else "trl-standard"
    raise ValueError(
        f"cannot tell the preference format from the columns {sorted(record)}; known formats: "
        f"{', '.join(FORMATS)} (pairs need chosen/rejected, or RMB's conversation_input/chosen/reject); "
        "pass the format by name if the columns are right"
    )


def _has_scores(record: dict) -> bool:
    metadata = record.get("metadata")
    return "score_chosen" in record or (isinstance(metadata, dict) and "score_chosen" in metadata)


# ----------------------------------------------------------------------------------------------
# Conversation pieces


def messages_from(value, field: str) -> list[Message]:
    """A non-empty list of ``{role, content}`` dicts, checked and normalised (extra keys dropped)."""
    if not isinstance(value, list) or not value:
        raise RowError(field, f"expected a non-empty list of {{role, content}} messages, got {_kind(value)}")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _message(value, field: str) -> Message:
    if not isinstance(value, dict):
        raise RowError(field, f"a message must be an object with role and content, got {_kind(value)}")
    if value.get("role") not in ROLES:
        raise RowError(f"{field}.role", f"unknown role {value.get('role')!r}; expected one of {', '.join(ROLES)}")
    return {"role": value["role"], "content": require_text(value, "content", f"{field}.content")}


def _kind(value) -> str:
    return f"{type(value).__name__} {value!r}"[:60]


def split_transcript(text: str, field: str) -> list[Message]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> user/assistant turns, each stripped of surrounding whitespace."""
    parts = HH_MARKER.split(text)
    if len(parts) == 1:
        raise RowError(field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turn markers in the transcript")
    if parts[0].strip():
        raise RowError(field, f"text before the first 'Human:' marker: {parts[0][:40]!r}")
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def is_transcript(text: str) -> bool:
    return text.lstrip(" \n").startswith("Human:")


def prompt_turns(prompt: str, field: str = "prompt") -> list[Message]:
    """A string prompt -> one user turn, or its turns when it is a flattened hh-rlhf transcript."""
    if not is_transcript(prompt):
        return [{"role": "user", "content": prompt}]
    turns = split_transcript(prompt, field)
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()  # "...\n\nAssistant:" waiting for the response
    return turns


def reply(content: str) -> list[Message]:
    return [{"role": "assistant", "content": content}]


def check_ends_with_assistant(messages: list[Message], field: str) -> list[Message]:
    if messages[-1]["role"] != "assistant":
        last = messages[-1]["role"]
        raise RowError(field, f"the conversation must end with an assistant turn, not a {last!r} turn")
    return messages


def _number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise RowError(field, f"expected a number, got {_kind(value)}")
    return float(value)


def _optional_text(record: dict, key: str) -> str | None:
    return None if record.get(key) is None else require_text(record, key)


# ----------------------------------------------------------------------------------------------
# One parser per format: record -> (chosen, rejected, subset, margin); raises RowError


def parse_conversational(record: dict) -> tuple:
    prefix = _prompt_prefix(record)
    chosen = prefix + messages_from(record.get("chosen"), "chosen")
    rejected = prefix + messages_from(record.get("rejected"), "rejected")
    return _pair(chosen, rejected), _optional_text(record, "subset"), _optional_margin(record)


def _prompt_prefix(record: dict) -> list[Message]:
    prompt = record.get("prompt")
    if prompt is None:
        return []
    return prompt_turns(prompt) if isinstance(prompt, str) else messages_from(prompt, "prompt")


def parse_trl_standard(record: dict) -> tuple:
    turns = prompt_turns(require_text(record, "prompt"))
    chosen = turns + reply(require_text(record, "chosen"))
    rejected = turns + reply(require_text(record, "rejected"))
    return _pair(chosen, rejected), _optional_text(record, "subset"), _optional_margin(record)


def parse_rewardbench(record: dict) -> tuple:
    require_text(record, "subset")
    return parse_trl_standard(record)


def parse_hh_rlhf(record: dict) -> tuple:
    chosen = split_transcript(require_text(record, "chosen"), "chosen")
    rejected = split_transcript(require_text(record, "rejected"), "rejected")
    return _pair(chosen, rejected), _optional_text(record, "subset"), _optional_margin(record)


def parse_ultrafeedback(record: dict) -> tuple:
    chosen, rejected = (_uf_side(record, key) for key in ("chosen", "rejected"))
    scores = record.get("metadata") if "score_chosen" not in record else record
    if not isinstance(scores, dict):
        raise RowError("metadata", f"expected an object with score_chosen / score_rejected, got {_kind(scores)}")
    where = "" if scores is record else "metadata."
    margin = _scores_margin(scores, where)
    return _pair(chosen, rejected), _optional_text(record, "subset"), margin


def _uf_side(record: dict, key: str) -> list[Message]:
    """A message list that holds the user turn already, or a response string to the ``prompt``."""
    value = record.get(key)
    if isinstance(value, list):
        return messages_from(value, key)
    return [{"role": "user", "content": require_text(record, "prompt")}] + reply(require_text(record, key))


def _scores_margin(scores: dict, where: str) -> float:
    for key in ("score_chosen", "score_rejected"):
        if scores.get(key) is None:
            raise RowError(where + key, "missing field")
    chosen = _number(scores["score_chosen"], where + "score_chosen")
    return chosen - _number(scores["score_rejected"], where + "score_rejected")


def parse_rmb(record: dict) -> tuple:
    turns = messages_from(record.get("conversation_input"), "conversation_input")
    chosen = turns + reply(_answer(record, "chosen"))
    rejected = turns + reply(_answer(record, "reject"))
    return _pair(chosen, rejected), _rmb_subset(record), None


def _answer(record: dict, key: str) -> str:
    side = record.get(key)
    if not isinstance(side, dict):
        raise RowError(key, f"expected an object with an 'answer', got {_kind(side)}")
    return require_text(side, "answer", f"{key}.answer")


def _rmb_subset(record: dict) -> str | None:
    """``Pairwise_set/Helpfulness/Chat/Discussion`` -> ``Helpfulness/Chat/Discussion``."""
    path = _optional_text(record, "category_path") or _optional_text(record, "category_path_file")
    if path is None:
        return None
    head, _, rest = path.partition("/")
    return rest if head == "Pairwise_set" and rest else path


def _pair(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], list[Message]]:
    return check_ends_with_assistant(chosen, "chosen"), check_ends_with_assistant(rejected, "rejected")


def _optional_margin(record: dict) -> float | None:
    return None if record.get("margin") is None else _number(record["margin"], "margin")


PARSERS = {
    "conversational": parse_conversational,
    "trl-standard": parse_trl_standard,
    "rewardbench": parse_rewardbench,
    "hh-rlhf": parse_hh_rlhf,
    "ultrafeedback": parse_ultrafeedback,
    "rmb": parse_rmb,
}


def parse_pair(record: dict, row: int, *, format: str, stem: str) -> tuple[PreferencePair, str, str | None]:
    """One record -> (PreferencePair, pair id, id column); raises RowError."""
    (chosen, rejected), subset, margin = PARSERS[format](record)
    pair_id, column = record_id(record, ID_COLUMNS.get(format, ("id",)), f"{stem}:{row}")
    return PreferencePair(pair_id, chosen, rejected, subset, margin), pair_id, column


# ----------------------------------------------------------------------------------------------
# Loading


def load_preferences(
    source: str,
    *,
    format: str | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[PreferencePair], LoadReport]:
    """Preference pairs from a local file, a hub id or ``synthetic:preferences?n=N&seed=S``.

    ``format`` is one of ``FORMATS``, or None to detect it from the first record's columns.
    """
    return load_rows(source, "preferences", FORMATS, detect_format, parse_pair, has_empty_response, format=format,
                     split=split, skip_invalid=skip_invalid, limit=limit)


def drop_identical(pairs: list[PreferencePair], report: LoadReport) -> list[PreferencePair]:
    """The pairs whose chosen and rejected conversations differ. A pair whose two sides are the same carries no
    preference (its features are the same on both sides, so every gate ties on it): it is dropped, its id recorded
    in ``report.identical_pairs``; when every pair is such, ``DataError`` (there is nothing to learn)."""
    kept = [p for p in pairs if p.chosen != p.rejected]
    report.identical_pairs = [p.pair_id for p in pairs if p.chosen == p.rejected]
    if pairs and not kept:
        raise DataError(report.path, None, None, f"all {len(pairs)} pairs have chosen identical to rejected: they "
                        "carry no preference, so there is nothing to learn from them")
    return kept


def has_empty_response(pair: PreferencePair) -> bool:
    return is_blank(pair.chosen[-1]["content"]) or is_blank(pair.rejected[-1]["content"])
