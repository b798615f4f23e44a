"""A dataset's records as the rows of its cache: one per rating row, chosen then rejected per pair,
and how they are cut into parts, shared among torchrun ranks and filtered by length (docs/method.md 5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import ATTRIBUTES


@dataclass
class Rows:
    """The rows to embed, flattened: one per rating row, two (chosen, rejected) per pair."""

    id: list[str]
    subset: list[str | None]
    pair_id: list[str | None]
    role: list[str | None]
    margin: list[float | None]  # the pair's, on both of its rows; None for ratings and pairs without one
    conversations: list[list[dict]]
    labels: np.ndarray  # [N, K] float32, NaN = missing

    def __len__(self):
        return len(self.id)

    def take(self, idx) -> "Rows":
        idx = list(idx)
        return Rows([self.id[i] for i in idx], [self.subset[i] for i in idx], [self.pair_id[i] for i in idx],
                    [self.role[i] for i in idx], [self.margin[i] for i in idx],
                    [self.conversations[i] for i in idx], self.labels[idx])


def rating_rows(records) -> Rows:
    """One row per RatingRow, its labels kept."""
    n = len(records)
    return Rows(id=[r.id for r in records], subset=[None] * n, pair_id=[None] * n, role=[None] * n,
                margin=[None] * n, conversations=[r.messages for r in records],
                labels=np.array([r.labels for r in records], dtype=np.float32).reshape(-1, len(ATTRIBUTES)))


def pair_rows(pairs) -> Rows:
    """Chosen then rejected for each PreferencePair, adjacent, in dataset order (labels all NaN)."""
    rows = Rows([], [], [], [], [], [], np.full((2 * len(pairs), len(ATTRIBUTES)), np.nan, dtype=np.float32))
    for p in pairs:
        for role, conv in (("chosen", p.chosen), ("rejected", p.rejected)):
            rows.id.append(f"{p.pair_id}:{role}")
            rows.subset.append(p.subset)
            rows.pair_id.append(p.pair_id)
            rows.role.append(role)
            rows.margin.append(p.margin)
            rows.conversations.append(conv)
    return rows


def keep_mask(lengths: np.ndarray, max_length: int, paired: bool) -> np.ndarray:
    """Rows that fit max_length; for pairs, a pair with one side too long is dropped whole."""
    keep = lengths <= max_length
    if paired:
        both = keep[0::2] & keep[1::2]
        keep = np.repeat(both, 2)
    return keep


def part_bounds(n_rows: int, part_rows: int, paired: bool) -> list[tuple[int, int]]:
    """Row ranges of the parts; a part never splits a pair."""
    step = max(2, part_rows - part_rows % 2) if paired else max(1, part_rows)
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def balance_parts(part_tokens, world_size: int) -> list[list[int]]:
    """Which parts each of ``world_size`` ranks writes: disjoint shares with about equal tokens.

    Greedy longest-first: parts by token count, largest first (ties by index), each to the rank with
    the fewest tokens so far (ties to the lowest rank). A pure function of its inputs, so every rank
    computes the same shares without asking the others; no rank's share exceeds the mean by more than
    the largest part. Returns positions into ``part_tokens``, ascending within each share.
    """
    tokens = [int(t) for t in part_tokens]
    loads, shares = [0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        loads[r] += tokens[i]
        shares[r].append(i)
    return [sorted(s) for s in shares]
