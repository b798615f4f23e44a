"""`urm curate`: preference pairs judged by a reward model with uncertainty -> the pairs worth keeping, or the
unlabelled pairs worth labelling next.

The wiring: read the pairs (a preference file in any format pipeline.data.preferences reads, scored through an
export as `urm score` scores them; or a preference cache, scored by the heads on its cached features, its
conversations read back from the source the cache's manifest names), judge every pair
(pipeline.eval.curation: P(chosen) under Bradley-Terry and the Gaussians at the fitted temperatures, the
ensemble's disagreement), then write OUT_DIR as one atomic folder (pipeline.atomic.atomic_directory):

  scored.jsonl    one row per pair: id, subset, score_chosen, score_rejected, p_chosen, p_chosen_gaussian,
                  ensemble_disagreement (with an ensemble), p_chosen_epistemic (with a ridge posterior), the certainty
                  under --signal, suspect, kept
  curated.jsonl   the kept pairs as TRL conversational rows ({id, chosen: [messages], rejected: [messages]}),
                  which `urm extract` reads back
  report.md       counts and the rule, with p_chosen.png: the distributions with the thresholds marked

With ``--select N`` the input is unlabelled pairs (pipeline.data.response_pairs; A in the chosen slot) and
``selected.jsonl`` holds the N pairs the model is least sure of, each with the signal and its value.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.atomic import atomic_directory, write_text
from pipeline.configs import CurateConfig
from pipeline.errors import UserError
from pipeline.eval import (PLOT, JudgedPairs, check_signal, curated, curation_plot, judge_pairs, selected, side_scores,
                           write_curation_report)
from pipeline.outputs import FOLDER, OwnFiles, check_output

logger = logging.getLogger(__name__)

WRITES = ("scored.jsonl", "curated.jsonl", "selected.jsonl", "report.md", PLOT)  # everything OUT_DIR may hold


class CurateError(UserError):
    """The pairs or the model cannot be curated."""


# ----------------------------------------------------------------------------------------------
# Reading and scoring


def is_cache(source: str) -> bool:
    return (Path(source) / "_manifest.json").is_file()


def read_pairs_file(source: str, cfg: CurateConfig) -> tuple[list, int]:
    """(labelled pairs (curating) or unlabelled response pairs (``--select``), how many pairs were dropped as
    identical); CurateError when there are none. Pairs whose chosen is identical to their rejected are dropped and
    counted as `urm extract` drops them (``drop_identical``: they carry no preference, and every model is "sure" of
    them); a file of nothing else is refused. The load report is logged."""
    from pipeline.data import drop_identical, input_kind, load_preferences, load_response_pairs

    if cfg.select is not None:
        pairs, report = load_response_pairs(source, skip_invalid=cfg.reading.skip_invalid, limit=cfg.reading.limit)
    else:
        if cfg.reading.format is None and input_kind(source) != "pairs":
            raise CurateError(f"{source}: its rows hold no chosen/rejected pairs (conversations to score go to `urm "
                              "score`; unlabelled two-response rows to `urm curate --select N`)")
        pairs, report = load_preferences(source, format=cfg.reading.format, skip_invalid=cfg.reading.skip_invalid,
                                         limit=cfg.reading.limit)
        pairs = drop_identical(pairs, report)
    logger.info(report.summary())
    if not pairs:
        raise CurateError(f"{source}: no pairs to curate ({report.rows_skipped} rows skipped)")
    return pairs, len(report.identical_pairs)


def score_with_export(model_dir: str, source: str, cfg: CurateConfig) -> JudgedPairs:
    """Both sides of every pair through the export, batched as `urm score` does."""
    from pipeline.features import pad_id_of, render_ids
    from pipeline.model.modeling_urm import pair_temperatures
    from pipeline.serve import export_config, flatten, length_limit, load_scorer, score_ids, within_length

    urm = export_config(model_dir).urm
    require_members(cfg, urm.get("members", 1), model_dir, bool(urm.get("posterior")))  # before anything loads
    pairs, identical = read_pairs_file(source, cfg)
    model, tokenizer = load_scorer(model_dir, cfg.runtime.dtype, cfg.runtime.device, cfg.runtime.verify)
    ids = render_ids(tokenizer, flatten("pairs", pairs))
    pairs, ids, dropped = within_length("pairs", pairs, ids, length_limit(model.config, cfg.reading.max_length))
    out = score_ids(model, ids, cfg.runtime.max_tokens_per_batch, pad_id_of(tokenizer))
    t = pair_temperatures(model.config)
    return JudgedPairs(pairs, side_scores(out, 0), side_scores(out, 1), t["bt"], t["gaussian"], dropped,
                       f"export {model_dir}", identical)


def score_cached(model_dir: str, cache: str, cfg: CurateConfig) -> JudgedPairs:
    """A preference cache's pairs scored by the heads on their cached features; the conversations come from the
    source file the manifest names (curated.jsonl needs them), matched by pair id, once the source is checked to be
    what the cache was extracted from (``check_source``: an edited file would pair old features with new rows)."""
    from pipeline.cache import read_pairs, require_kind
    from pipeline.eval.baselines import heads_scores
    from pipeline.features import checkpoint_identity
    from pipeline.model import check_features, load_for_evaluation

    if cfg.select is not None:
        raise CurateError(f"{cache}: --select reads unlabelled pairs from a file; a cache holds labelled pairs")
    require_kind(cache, "preferences", "--input")
    heads, meta, what = load_for_evaluation(model_dir, checkpoint_identity)
    require_members(cfg, heads.architecture["members"], model_dir, bool(heads.architecture.get("posterior")))
    cached = read_pairs(cache, verify=cfg.runtime.verify)
    check_features(Path(cache), cached.chosen.manifest, meta)
    dataset, read = check_source(cache, cached.chosen.manifest)
    try:
        from pipeline.data import load_preferences

        pairs, _ = load_preferences(read["source"], format=read["format"], split=read["split"], skip_invalid=True)
    except UserError as e:
        raise CurateError(f"{cache}: curated.jsonl needs the pairs' conversations, and the cache's source "
                          f"{dataset!r} cannot be read ({e})") from None
    by_id = {p.pair_id: p for p in pairs}
    missing = [i for i in cached.chosen.pair_id if i not in by_id]
    if missing:
        raise CurateError(f"{cache}: {len(missing)} cached pairs (e.g. {missing[0]!r}) are not in its source "
                          f"{dataset!r} any more: extract the cache again")
    with torch.no_grad():
        chosen, rejected = (heads_scores(heads, side.embedding) for side in (cached.chosen, cached.rejected))
    p = meta.pair_calibration
    return JudgedPairs([by_id[i] for i in cached.chosen.pair_id], chosen, rejected,
                       p.temperature_bt if p else 1.0, p.temperature_gaussian if p else 1.0, 0, what)


def check_source(cache: str, manifest: dict) -> tuple[str, dict]:
    """(the cache's source as its manifest names it, how extraction read it: source, split, format, limit), once the
    source's fingerprint now is the one the manifest recorded (``dataset_fingerprint``); CurateError otherwise.
    A cache extracted before the reading was recorded (manifest ``info.source_read``) is checked as read with the
    defaults, which is how most caches were read."""
    from pipeline.data import fingerprint, source_kind, split_hub_id

    dataset = manifest.get("dataset")
    read = {"source": dataset, "split": "train", "format": None, "limit": None}
    recorded = (manifest.get("info") or {}).get("source_read")
    if isinstance(recorded, dict):
        read.update({k: v for k, v in recorded.items() if k in read})
    elif isinstance(dataset, str) and source_kind(dataset) == "hub" and (manifest.get("extra") or {}).get(
            "dataset_revision"):  # read at the commit the extraction pinned
        read["source"] = f"{split_hub_id(dataset)[0]}@{manifest['extra']['dataset_revision']}"
    try:
        now = fingerprint(read["source"], split=read["split"], format=read["format"], limit=read["limit"])
    except UserError as e:
        raise CurateError(f"{cache}: curated.jsonl needs the pairs' conversations, and the cache's source "
                          f"{dataset!r} cannot be read ({e})") from None
    if now != manifest.get("dataset_fingerprint"):
        why = "" if isinstance(recorded, dict) else (" (or it was extracted with --limit, --format or a split the "
                                                      "manifest of a cache this old does not record)")
        raise CurateError(f"{cache}: its source {dataset!r} is not what the cache was extracted from: its fingerprint "
                          f"differs from the manifest's dataset_fingerprint{why}, so the cached features may belong to "
                          "other pairs or orientations; extract the cache again (`urm extract --overwrite`), or curate "
                          "the file itself through an export")
    return dataset, read


def require_members(cfg: CurateConfig, members: int, model_dir: str, posterior: bool = True) -> None:
    """Before anything is scored: --signal ensemble needs an ensemble, --signal epistemic a ridge posterior."""
    if cfg.signal == "ensemble" and members < 2:
        raise CurateError(f"--signal ensemble needs an ensemble, and {model_dir} has one value head; use --signal "
                          "bt or gaussian, or train the value head with --ensemble 2 or more")
    if cfg.signal == "epistemic" and not posterior:
        raise CurateError(f"--signal epistemic needs the heads' ridge posterior (epistemic_std), and {model_dir} has "
                          "none (an AdamW-trained value head, or one saved before it was kept); use --signal bt or "
                          "gaussian, or train the value head with --loss ridge (the default)")


def run_curate(model_dir: str, cfg: CurateConfig) -> dict:
    """Judge every pair of ``cfg.input`` with the model in ``model_dir``; write ``cfg.out_dir`` atomically (module
    docstring)."""
    from pipeline.serve import jsonl_lines

    source, out_dir = cfg.input, cfg.out_dir
    check_output(out_dir, "--out-dir", FOLDER, inputs=curate_inputs(model_dir, source), overwrite=cfg.overwrite,
                 own=OwnFiles(lambda name: name in WRITES))  # before anything is scored
    data = (score_cached if is_cache(source) else score_with_export)(model_dir, source, cfg)
    judged = judge_pairs(data.chosen, data.rejected, data.temperature_bt, data.temperature_gaussian)
    check_signal(judged, cfg.signal)
    made = (selected if cfg.select is not None else curated)(data, judged, cfg)
    with atomic_directory(out_dir) as folder:
        for name, rows in made.files.items():
            write_text(folder / name, "".join(jsonl_lines(rows)))
        curation_plot(folder / PLOT, **made.plot)
        result = made.summary
        result.update(input=source, model=data.model, pairs=len(data.pairs), dropped=data.dropped, signal=cfg.signal,
                      temperature_bt=data.temperature_bt, identical=data.identical)
        write_curation_report(folder, result)
    return {**result, "out_dir": out_dir}


def curate_inputs(model_dir: str, source: str) -> list[tuple[str, str]]:
    """What `urm curate` reads, for the output rule: the model, the input and, for a cache, the file it names."""
    inputs = [("MODEL_DIR", model_dir), ("--input", source)]
    if is_cache(source):
        from pipeline.cache import CacheError, read_manifest

        try:
            dataset = read_manifest(source).get("dataset")
        except CacheError:  # a damaged cache is refused when it is read
            dataset = None
        if isinstance(dataset, str) and Path(dataset).exists():
            inputs.append(("the cache's source", dataset))
    return inputs


def summary(result: dict) -> str:
    """One line for the CLI."""
    if result["mode"] == "select":
        return (f"selected the {result['selected']} of {result['pairs']} pairs the model is least sure of "
                f"(--signal {result['signal']}) -> {result['out_dir']}/selected.jsonl")
    k = result.get("identical") or 0
    identical = f" ({k} identical pair{'s' if k != 1 else ''} dropped)" if k else ""
    return (f"curated {result['pairs']} pairs{identical}: {result['suspects']} suspect, {result['kept']} kept "
            f"({result['rule']}) -> {result['out_dir']}/curated.jsonl (scores: scored.jsonl, report.md)")
