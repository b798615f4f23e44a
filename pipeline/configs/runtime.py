"""The option groups the commands that score with an export share, written once: where and how the model runs
(``Runtime``: device, dtype, verify, token budget) and how an input file is read (``Reading``: format, skip-invalid,
limit, max length). `urm score`, `urm curate` and `urm serve` hold them as groups without a prefix, so each
option keeps its one flat name (``--device``, ``URM_DEVICE``) and its one help text everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configs.options import DEVICE_HELP, SCORING_DTYPE_HELP, device_name, one_of, opt, whole
from pipeline.device import AUTO_DTYPES, COMPUTE_DTYPES

EXPORT_VERIFY_HELP = ("Check every file of the export (for `urm curate` on a cache: every cache part) against the "
                      "checksums recorded when it was written, before it is used; --no-verify only checks that they "
                      "are there (and the heads' own checksum).")
MAX_LENGTH_HELP = ("Drop (and count) conversations longer than this many tokens, a pair with either side whole "
                   "(default: the longest the heads were trained on, from the export; never more than the backbone's "
                   "positions).")


@dataclass
class Runtime:
    """Where and how an export runs: device, compute dtype, the checksums checked before loading, the token budget."""

    device: str = opt("auto", DEVICE_HELP)
    dtype: str = opt("auto", SCORING_DTYPE_HELP)
    verify: bool = opt(True, EXPORT_VERIFY_HELP)
    max_tokens_per_batch: int = opt(8192, "Token budget per forward pass (padded batch size x longest row).")

    def __post_init__(self):
        device_name(self.device)
        one_of(self.dtype, (*AUTO_DTYPES, *COMPUTE_DTYPES), "dtype")
        whole(self.max_tokens_per_batch, "max_tokens_per_batch")


@dataclass
class Reading:
    """How an input file of conversations or pairs is read: its format, bad rows, how many rows, how long."""

    format: str | None = opt(None, "Input format for pairs (default: detect from the columns): conversational, "
                             "trl-standard, rewardbench, hh-rlhf, ultrafeedback or rmb.")
    skip_invalid: bool = opt(False, "Skip malformed input rows (counted) instead of stopping.")
    limit: int | None = opt(None, "Read only the first N rows (pairs) of the input (`urm curate` then drops pairs "
                            "whose chosen is identical to their rejected, so it may curate fewer).")
    max_length: int | None = opt(None, MAX_LENGTH_HELP)

    def __post_init__(self):
        if self.format is not None:
            from pipeline.data import PAIR_FORMATS  # the names live with the readers

            one_of(self.format, PAIR_FORMATS, "format")
        whole(self.limit, "limit", allow_none=True)
        whole(self.max_length, "max_length", allow_none=True)
