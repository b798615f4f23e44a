"""`urm curate`'s config: how preference pairs are scored, which count as suspect, which are kept, and how many
unlabelled pairs `--select` picks for labelling."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configs.options import SCORING_DTYPE_HELP, ConfigError, check, number, one_of, opt, whole
from pipeline.configs.serve import check_scoring

SIGNALS = ("bt", "gaussian", "ensemble", "epistemic")  # pipeline.eval.curation.SIGNALS (configs import no stage)


@dataclass
class CurateConfig:
    """`urm curate`: score both sides of every pair with an export (or cached features with their heads), flag the
    pairs the model confidently reverses, keep the most certain ones; or pick the pairs to label next."""

    keep_certain: float = opt(0.5, "Keep this share of the pairs, the ones the model is most certain are labelled "
                              "right (by --signal), dropping suspects too (URME's rule: the most certain half); 1 keeps "
                              "every pair that is not suspect.")
    drop_suspect_only: bool = opt(False, "Keep every pair but the suspects (--keep-certain is then not used).")
    suspect_threshold: float = opt(0.2, "A pair is suspect when the model's P(chosen better) (Bradley-Terry, at the "
                                   "export's fitted temperature) is below this: it confidently prefers the rejected "
                                   "side.")
    signal: str = opt("gaussian", "The certainty that ranks pairs: bt (Bradley-Terry P(chosen)), gaussian (P(chosen) "
                      "under the Gaussian scores, the stated std included), ensemble (the members' mean gap over "
                      "their spread; needs an ensemble), epistemic (P(chosen) under the ridge posterior's epistemic_std; "
                      "needs the closed-form value head). With --select: how close the pair's P is to 1/2 (or the "
                      "members' disagreement).")
    select: int | None = opt(None, "Instead of curating: the input is unlabelled response pairs (two responses per "
                             "prompt); write the N whose preference the model is least sure of to selected.jsonl.")
    max_tokens_per_batch: int = opt(8192, "Token budget per forward pass (padded batch size x longest row).")
    dtype: str = opt("auto", SCORING_DTYPE_HELP)
    device: str = opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, ...")
    format: str | None = opt(None, "Input format for pairs (default: detect from the columns).")
    skip_invalid: bool = opt(False, "Skip malformed input rows (counted) instead of stopping.")
    limit: int | None = opt(None, "Read only the first N rows (pairs) of the input; pairs whose chosen is identical "
                            "to their rejected are dropped after that, so fewer may be curated.")
    overwrite: bool = opt(False, "Replace an OUT_DIR that holds files of its own, not only an earlier `urm curate` "
                          "output (an earlier output is replaced anyway; a folder holding an input never is).")
    max_length: int | None = opt(None, "Drop (and count) pairs with a side longer than this many tokens (default: "
                                 "the longest the heads were trained on, from the export).")
    verify: bool = opt(True, "Check the export's files (or the cache's parts) against their recorded checksums "
                       "before use; --no-verify checks sizes only.")

    def __post_init__(self):
        check(number(self.keep_certain) and 0 < self.keep_certain <= 1, "keep_certain", self.keep_certain,
              "a share of the pairs, above 0 and at most 1")
        check(number(self.suspect_threshold) and 0 < self.suspect_threshold < 0.5, "suspect_threshold",
              self.suspect_threshold, "a probability between 0 and 0.5 (exclusive): below 1/2 the model prefers "
              "the rejected side")
        one_of(self.signal, SIGNALS, "signal")
        whole(self.select, "select", allow_none=True)
        if self.select is not None and self.drop_suspect_only:
            raise ConfigError("--select picks unlabelled pairs to label; --drop-suspect-only curates labelled ones: "
                              "give one of them")
        check_scoring(self)
