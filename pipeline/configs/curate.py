"""`urm curate`'s config: how preference pairs are scored, which count as suspect, which are kept, and how many
unlabelled pairs `--select` picks for labelling."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configs.options import ConfigError, check, group, number, one_of, opt, whole
from pipeline.configs.runtime import Reading, Runtime


@dataclass
class CurateConfig:
    """`urm curate`: score both sides of every pair with an export (or cached features with their heads), flag the
    pairs the model confidently reverses, keep the most certain ones; or pick the pairs to label next."""

    input: str | None = opt(None, "Preference pairs (any format `urm extract` reads), a preference cache, or with "
                            "--select unlabelled two-response rows. Required.", short="-i")
    out_dir: str | None = opt(None, "The folder to write (replaced atomically as a whole). Required.")
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
    runtime: Runtime = group(Runtime(), "")
    reading: Reading = group(Reading(), "")
    overwrite: bool = opt(False, "Replace an --out-dir that holds files of its own, not only an earlier `urm curate` "
                          "output (an earlier output is replaced anyway; a folder holding an input never is).")

    def __post_init__(self):
        check(number(self.keep_certain) and 0 < self.keep_certain <= 1, "keep_certain", self.keep_certain,
              "a share of the pairs, above 0 and at most 1")
        check(number(self.suspect_threshold) and 0 < self.suspect_threshold < 0.5, "suspect_threshold",
              self.suspect_threshold, "a probability between 0 and 0.5 (exclusive): below 1/2 the model prefers "
              "the rejected side")
        from pipeline.eval import SIGNALS  # the names live with the curation math

        one_of(self.signal, SIGNALS, "signal")
        whole(self.select, "select", allow_none=True)
        if self.select is not None and self.drop_suspect_only:
            raise ConfigError("--select picks unlabelled pairs to label; --drop-suspect-only curates labelled ones: "
                              "give one of them")
