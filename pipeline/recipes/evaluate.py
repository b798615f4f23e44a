"""`urm evaluate`: trained heads on held-out caches, beside baselines fitted in the same run (docs/method.md 6).

The wiring: load the heads (a heads folder, or an export's copy of them), read the held-out
preference caches (and a ratings cache when given) and refuse any made with another backbone or
template; fit the baselines on the heads' own training caches (pipeline.eval.baselines); score every
model on every held-out cache (pipeline.eval.evaluation); write report.json, report.md and the plots
(pipeline.eval.report); return the tables for the CLI.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.atomic import atomic_directory
from pipeline.configs import ConfigError, EvaluateConfig, build, options
from pipeline.eval import Candidate, compare, is_report_file
from pipeline.model import PUBLISHED_LOSS, HeadsError, HeadsMeta, check_features, load_for_evaluation
from pipeline.outputs import FOLDER, OwnFiles, check_output


def cache_path(cfg: EvaluateConfig, name: str) -> Path:
    """A cache given by path, or by name under ``cfg.cache_dir``."""
    return Path(name) if Path(name).exists() else Path(cfg.cache_dir) / name


def named_caches(cfg: EvaluateConfig) -> list[tuple[str, str, str]]:
    """(the cache as typed, the kind it must hold, the option that named it) for every cache option given."""
    named = [(name, "preferences", "--eval-preferences") for name in cfg.eval_preferences]
    named += [(name, "ratings", "--shift-ratings") for name in cfg.shift_ratings]
    named += [(name, kind, flag) for name, kind, flag in ((cfg.eval_ratings, "ratings", "--eval-ratings"),
                                                          (cfg.train_ratings_cache, "ratings", "--train-ratings-cache"),
                                                          (cfg.train_preferences_cache, "preferences",
                                                           "--train-preferences-cache")) if name]
    return named


def check_cache_kinds(cfg: EvaluateConfig) -> None:
    """Every cache an option names is there and holds the kind that option takes (pairs or ratings): checked before
    anything loads, the error naming the option and the cache as typed (CacheError)."""
    from pipeline.cache import CacheError, require_kind

    for name, kind, flag in named_caches(cfg):
        path = cache_path(cfg, name)
        if not path.exists():
            raise CacheError(f"{flag} {name}: no such cache (neither {name} nor {Path(cfg.cache_dir) / name} is "
                             "there); give a cache folder, or a name under --cache-dir")
        require_kind(path, kind, flag, typed=name)


def read_eval_caches(cfg: EvaluateConfig, meta: HeadsMeta, device):
    """The held-out pairs by name, the held-out ratings (or None), and the other sources' rated caches by name."""
    from pipeline.cache import read_features, read_pairs

    if not cfg.eval_preferences and not cfg.eval_ratings:
        raise ConfigError("nothing to evaluate: give --eval-preferences CACHE (and/or --eval-ratings CACHE), or set "
                          "them in the preset's [evaluate] table")
    pairs = {}
    for name in cfg.eval_preferences:
        path = cache_path(cfg, name)
        pairs[path.name] = (path, read_pairs(path, device=device, verify=cfg.verify))
        check_features(path, pairs[path.name][1].chosen.manifest, meta)
    ratings = None
    if cfg.eval_ratings:
        path = cache_path(cfg, cfg.eval_ratings)
        ratings = (path, read_features(path, device=device, verify=cfg.verify))
        check_features(path, ratings[1].manifest, meta)
        names = list(ratings[1].manifest.get("label_names") or [])
        if names and names != list(meta.attributes):
            raise HeadsError(f"{path}: its labels are {names}, the heads predict {meta.attributes}")
    shift = {}
    for name in cfg.shift_ratings:
        path = cache_path(cfg, name)
        shift[path.name] = (path, read_features(path, device=device, verify=cfg.verify))
        check_features(path, shift[path.name][1].manifest, meta)
    return pairs, ratings, shift


# ----------------------------------------------------------------------------------------------
# Baselines


def baselines_on_training_caches(cfg: EvaluateConfig, heads, meta: HeadsMeta,
                                 eval_pairs: dict) -> tuple[list[Candidate], dict]:
    """Every baseline of pipeline.eval.baselines, fitted on the training caches; (candidates, what each fit found)."""
    from pipeline.cache import read_features, read_pairs
    from pipeline.configs import GatingConfig, ValueHeadConfig
    from pipeline.device import resolve_device
    from pipeline.eval import baselines as B
    from pipeline.train import split_rows

    device = resolve_device(cfg.device)
    ratings_path = cfg.train_ratings_cache or meta.value_head.cache.path
    pairs_path = cfg.train_preferences_cache or (meta.gating.cache.path if meta.gating else None)
    if pairs_path is None:
        raise ConfigError("the heads have no gate, so heads.json names no training pairs for the baselines: give "
                          "--train-preferences-cache, or --no-baselines")
    for path in (ratings_path, pairs_path):
        if not Path(path).exists():
            raise ConfigError(f"training cache {path} (from heads.json) is not there: give --train-ratings-cache / "
                              "--train-preferences-cache, or --no-baselines")
    ratings = read_features(ratings_path, device=device, verify=cfg.verify)
    pairs = read_pairs(pairs_path, device=device, verify=cfg.verify)
    check_features(Path(pairs_path), pairs.chosen.manifest, meta)
    value_cfg = recorded_config(ValueHeadConfig, meta.value_head.config, device=cfg.device)
    gating_cfg = recorded_config(GatingConfig, meta.gating.config if meta.gating else {}, device=cfg.device)
    _, val = split_rows(len(pairs), gating_cfg.optim.val_fraction, gating_cfg.run.seed, "--gate-val-fraction")
    val_pairs = pairs.select(val)  # the pairs the gate's early stopping held out: every temperature is fitted there
    bases = [pairs.chosen.base_score, pairs.rejected.base_score] + [f.base_score for _, p in eval_pairs.values()
                                                                     for f in (p.chosen, p.rejected)]
    caches = B.TrainingCaches(ratings, pairs, val_pairs, base_score=all(not torch.isnan(b).any() for b in bases))
    chosen_gate = (meta.gating.selection or {}).get("chosen") if meta.gating else None
    recipe = B.HeadsRecipe(value_cfg, gating_cfg, gate=chosen_gate,
                           on_these_caches=meta.gating is not None and cfg.train_ratings_cache is None
                           and cfg.train_preferences_cache is None)
    candidates, info = B.fit_baselines(heads, caches, recipe, cfg.baseline_ensemble, list(meta.attributes))
    return candidates, {"train": {"ratings": str(ratings_path), "preferences": str(pairs_path),
                                  "validation_pairs": len(val)}, "fits": info}


def recorded_config(cls, recorded: dict, **changes):
    """A stage config rebuilt from the flat options heads.json recorded (unknown keys left out)."""
    known = {o.name for o in options(cls)}
    return build(cls, {**{k: v for k, v in recorded.items() if k in known}, **changes})


# ----------------------------------------------------------------------------------------------
# Entry point


def describe(meta: HeadsMeta) -> str:
    sigma = meta.sigma_calibration
    how = "calibrated sigma" if sigma and sigma.method == "calibrated" else (
        "sigma never calibrated" if meta.value_head.config.get("loss") == PUBLISHED_LOSS else "sigma as trained")
    gate = meta.architecture.get("gate") or "no"
    return (f"the heads under evaluation: {meta.value_head.config.get('loss')} value head ({how}), {gate} gate, "
            f"{meta.architecture.get('members', 1)} member(s)")


def run_evaluate(cfg: EvaluateConfig, model_dir: str | None = None) -> dict:
    """Evaluate the heads in ``model_dir`` (default ``cfg.heads_dir``); write the report; return it."""
    from pipeline.device import resolve_device
    from pipeline.eval import heads_candidate, write_report

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    inputs = [("MODEL_DIR", model_dir or cfg.heads_dir)] + [(flag, cache_path(cfg, name)) for name, _, flag in
                                                            named_caches(cfg)]
    check_output(cfg.report_dir, "--report-dir", FOLDER, inputs=inputs, overwrite=cfg.overwrite,
                 own=OwnFiles(is_report_file))  # before anything loads
    from pipeline.features import checkpoint_identity

    heads, meta, loaded = load_for_evaluation(model_dir or cfg.heads_dir, checkpoint_identity)
    check_cache_kinds(cfg)  # before any cache is read, and before the baselines train
    if cfg.baselines and not meta.value_head.cache.path and not (cfg.train_ratings_cache and cfg.train_preferences_cache):
        raise ConfigError(f"{loaded} names no training caches for the baselines: give --train-ratings-cache and "
                          "--train-preferences-cache, or --no-baselines")
    heads = heads.to(device)
    eval_pairs, eval_ratings, shift_ratings = read_eval_caches(cfg, meta, device)
    candidates = [heads_candidate("URM (these heads)", describe(meta), heads, meta.pair_calibration)]
    fitted = {}
    if cfg.baselines:
        more, fitted = baselines_on_training_caches(cfg, heads, meta, eval_pairs)
        candidates += more
        same = [name for name, found in fitted["fits"].items() if found.get("same_as")]
        if same:
            candidates[0].about += f"; trained as the baseline '{same[0]}' would be, so that one is this row"
    models, curves = compare(candidates, eval_pairs, eval_ratings, shift_ratings, meta.attributes)
    report = {"format_version": 1, "pipeline_version": __version__, "heads": loaded,
              "backbone": meta.value_head.cache.backbone, "config": _config(cfg, model_dir),
              "eval": {"preferences": {n: {"path": str(path), "pairs": len(p)} for n, (path, p) in eval_pairs.items()},
                       "ratings": None if eval_ratings is None else {"path": str(eval_ratings[0]),
                                                                    "rows": len(eval_ratings[1])},
                       "shift_ratings": {n: {"path": str(path), "rows": len(f)} for n, (path, f) in shift_ratings.items()}},
              "chosen": chosen_automatically(meta), **fitted, "models": models}
    report["seconds"] = time.perf_counter() - t0
    with atomic_directory(cfg.report_dir) as folder:  # the whole report or none of it
        written = write_report(report, curves, folder)
    report["files"] = {k: str(Path(cfg.report_dir) / Path(v).name) for k, v in written.items()}
    return report


def chosen_automatically(meta: HeadsMeta) -> dict:
    """What training chose by itself, with the numbers that chose it (heads.json's ``selection`` records)."""
    return {"value_head": meta.value_head.selection, "gating": meta.gating.selection if meta.gating else {}}


def _config(cfg: EvaluateConfig, model_dir) -> dict:
    from pipeline.configs import to_dict

    return {**to_dict(cfg), "model_dir": model_dir}


def summary(report: dict) -> str:
    """The tables a person reads first, and where the report is."""
    from pipeline.eval import attributes_table, chosen_lines, pairs_table, shift_caches, shift_table

    lines = []
    for name, info in report["eval"]["preferences"].items():
        lines += [f"{name} ({info['pairs']} pairs):", *pairs_table(report["models"], name), ""]
    if report["eval"]["ratings"]:
        lines += [f"attributes ({report['eval']['ratings']['rows']} rows):", *attributes_table(report["models"]), ""]
    for cache in shift_caches(report["models"]):
        lines += [f"off its data? {cache} rows against the held-out ratings (AUROC 0.5: cannot tell):",
                  *shift_table(report["models"], cache), ""]
    if chosen_lines(report.get("chosen") or {}):
        lines += ["chosen automatically (heads.json):", *chosen_lines(report["chosen"]), ""]
    lines.append(f"report: {report['files']['md']} (and report.json, plots) in {report['seconds']:.1f} s")
    return "\n".join(lines)

