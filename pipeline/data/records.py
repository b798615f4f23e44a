"""The normalised record types that every loader produces (the error they raise, ``DataError``, is
``pipeline.errors``': file, row and field).

A conversation is a list of ``{"role": ..., "content": ...}`` dicts (the chat-template form used by
TRL and Hugging Face tokenizers); its last turn is the assistant's response being judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import ATTRIBUTES
from pipeline.errors import DataError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class RatingRow:
    """One rated response: HelpSteer2's five attributes, NaN where a rating is missing."""

    id: str
    messages: list[Message]
    labels: list[float]  # len(ATTRIBUTES), in ATTRIBUTES order

    def __post_init__(self):
        if len(self.labels) != len(ATTRIBUTES):  # a loader's bug, not the user's data: never a silent misalignment
            raise ValueError(f"RatingRow {self.id!r}: {len(self.labels)} labels, expected {len(ATTRIBUTES)} "
                             f"({', '.join(ATTRIBUTES)})")


@dataclass
class PreferencePair:
    """One pairwise preference: two conversations that share a prompt, chosen preferred."""

    pair_id: str
    chosen: list[Message]
    rejected: list[Message]
    subset: str | None = None
    margin: float | None = None


@dataclass
class LoadReport:
    """What a loader did: rows kept, rows skipped (with the reason for each), empty responses."""

    path: str
    format: str
    rows_loaded: int = 0
    rows_skipped: int = 0
    empty_responses: int = 0
    skipped: list[DataError] = field(default_factory=list)
    identical_pairs: list[str] = field(default_factory=list)  # ids of pairs dropped: chosen == rejected
    unlabeled_rows: int = 0  # rating rows with no rating at all (kept: every label of theirs is missing)

    def skip(self, err: DataError) -> None:
        self.rows_skipped += 1
        self.skipped.append(err)

    def summary(self, show: int = 5) -> str:
        lines = [
            f"{self.path} [{self.format}]: {self.rows_loaded} rows loaded, "
            f"{self.rows_skipped} skipped, {self.empty_responses} with an empty response (kept)"
        ]
        if self.identical_pairs:
            n, ids = len(self.identical_pairs), ", ".join(self.identical_pairs[:3])
            lines.append(f"  warning: {n} of {self.rows_loaded} pairs dropped: their chosen is identical to their "
                         f"rejected, so they carry no preference (e.g. {ids})")
        if self.unlabeled_rows:
            lines.append(f"  warning: {self.unlabeled_rows} of {self.rows_loaded} rows have no rating at all (kept: "
                         "they teach nothing, every label of theirs is missing)")
        for err in self.skipped[:show]:
            lines.append(f"  skipped: {err}")
        if len(self.skipped) > show:
            lines.append(f"  ... and {len(self.skipped) - show} more skipped rows")
        return "\n".join(lines)
