"""`urm evaluate`'s config: which heads, which held-out caches, which baselines, where the report goes."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configs.options import DEVICE_HELP, VERIFY_HELP, device_name, opt, whole
from pipeline.configs.paths import DEFAULT_PATHS


@dataclass
class EvaluateConfig:
    """`urm evaluate`: accuracy, calibration and uncertainty of trained heads on held-out caches, beside baselines."""

    cache_dir: str = opt(DEFAULT_PATHS["cache_dir"], "Folder holding the cached datasets (cache names are looked up "
                         "there).", shown="cache/PRESET")
    heads_dir: str = opt(DEFAULT_PATHS["heads_dir"], "The heads folder (or an export directory) to evaluate, when no "
                         "MODEL_DIR is given.", shown="runs/PRESET/heads")
    eval_preferences: list[str] = opt([], "Held-out preference caches: names under CACHE_DIR, or paths (repeat the "
                                      "option for several; each gets its own table). Giving any of --eval-preferences, "
                                      "--eval-ratings, --shift-ratings replaces the preset's held-out caches, all "
                                      "three.")
    eval_ratings: str | None = opt(None, "A held-out ratings cache (name or path) for the attribute metrics: held-out "
                                   "rows of the value head's own source, the reference of the shift check.")
    shift_ratings: list[str] = opt([], "Rated caches of other sources (names or paths, repeatable): how well each "
                                   "uncertainty signal tells their rows from the --eval-ratings rows, and how the "
                                   "intervals cover their labels (every --eval-preferences cache is checked too, "
                                   "each side of a pair as a row).")
    train_ratings_cache: str | None = opt(None, "Ratings cache the baselines train on (default: the one the heads "
                                          "were trained on, from heads.json).")
    train_preferences_cache: str | None = opt(None, "Preference cache the baselines train on (default: the gate's, "
                                              "from heads.json).")
    baselines: bool = opt(True, "Fit the baselines in the same run (linear BT probe, ArmoRM's ridge + softmax gate, "
                          "equal weights, the backbone's own score, the seed's URM recipe, URM with reparam / nll, the "
                          "seed's seeds-only ensemble); --no-baselines evaluates the heads alone.")
    baseline_ensemble: int = opt(4, "Members of the seeds-only ensemble baseline (the seed's URME).")
    report_dir: str = opt(DEFAULT_PATHS["report_dir"], "The folder report.json, report.md and the plots are written "
                          "into, as a whole (an earlier report there is replaced).", shown="runs/PRESET/eval")
    overwrite: bool = opt(False, "Replace a --report-dir that holds files of its own, not only an earlier report (a "
                          "folder holding an input of the run never is).")
    device: str = opt("auto", DEVICE_HELP)
    verify: bool = opt(True, VERIFY_HELP)

    def __post_init__(self):
        whole(self.baseline_ensemble, "baseline_ensemble", least=2)
        device_name(self.device)
