"""`urm train-value-head`, `urm train-gating` and `urm train-heads` (both): the training stages' wiring.

Stage 1 reads the ratings cache, fits the value head (``pipeline.train.trainers.fit_value_head``) and
writes a heads folder; stage 2 reads the heads and a preference cache made with the same backbone
and template, fits the gate (``fit_gate``) and adds it to the folder. Each stage records in
heads.json (``HeadsMeta``) its config, the cache it read, its history and its validation metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time

import numpy as np
import torch

from pipeline import ATTRIBUTES
from pipeline.configs import GatingConfig, ValueHeadConfig, to_dict
from pipeline.device import resolve_device
from pipeline.errors import UserError
from pipeline.model import (CacheIdentity, HeadsMeta, StageRecord, check_same_backbone, heads_writer,
                            load_heads, save_heads)
from pipeline.outputs import PARTS, check_output
from pipeline.train import Fit, NoPreference
from pipeline.train.optimization import flush_denormals

logger = logging.getLogger(__name__)


def stage_record(cfg, fit: Fit, cache: CacheIdentity) -> StageRecord:
    """The heads.json section of one stage: config, cache, per-epoch history, final metrics."""
    return StageRecord(config=to_dict(cfg), cache=cache, epochs_run=len(fit.history), best_epoch=fit.best_epoch,
                       history=fit.history, val=fit.val, selection=fit.selection)


def feature_rows(path: str, run, pairs: bool):
    """(minibatch source, labels, margin, manifest) of a cache: its features held on the device when they fit
    ``run.memory_budget`` (GB; default half the device's memory), else streamed from the part files
    (``pipeline.train.feature_stream``). Either way the epochs visit the parts in the same seeded order."""
    from pipeline.cache import read_features, read_manifest, read_pairs, row_index
    from pipeline.train import TensorRows, open_streamed, streams

    device = resolve_device(run.device)
    m = read_manifest(path)
    streamed, need, budget = streams(m, run.memory_budget, device)
    if streamed:
        rows, labels, margin = open_streamed(path, pairs=pairs, device=device, verify=run.verify)
        logger.info(f"{path}: {need / 1e9:.2f} GB of features exceed the memory budget of {budget / 1e9:.2f} GB "
                    f"(--memory-budget): streaming them from its {len(m['parts'])} parts")
        return rows, labels, margin, rows.manifest
    if pairs:
        p = read_pairs(path, device=device, verify=run.verify)
        first, sides = p.chosen, (p.chosen.embedding, p.rejected.embedding)
    else:
        first = read_features(path, device=device, verify=run.verify)
        sides = (first.embedding,)
    _, starts, index, _ = row_index(path, pairs=pairs, verify=False)  # each sample's part, for the order
    part = torch.from_numpy(np.searchsorted(starts, index[0], side="right") - 1)
    return TensorRows(*sides, part=part), first.labels, first.margin, first.manifest


def ratings_cache(cfg: ValueHeadConfig) -> str:
    """Stage 1's cache: --ratings-cache, else CACHE_DIR/ratings."""
    return cfg.ratings_cache or os.path.join(cfg.run.cache_dir, "ratings")


def preferences_cache(cfg: GatingConfig) -> str:
    """Stage 2's cache: --preferences-cache, else CACHE_DIR/preferences."""
    return cfg.preferences_cache or os.path.join(cfg.run.cache_dir, "preferences")


def stage_cache(cfg) -> tuple[str, str, str, str]:
    """(the stage's cache, the kind it holds, the option the user gave it with, the path as typed there):
    --ratings-cache / --preferences-cache, else --cache-dir (the cache named after the kind inside it)."""
    kind = "ratings" if isinstance(cfg, ValueHeadConfig) else "preferences"
    given = cfg.ratings_cache if kind == "ratings" else cfg.preferences_cache
    path = ratings_cache(cfg) if kind == "ratings" else preferences_cache(cfg)
    return (path, kind, f"--{kind}-cache", given) if given else (path, kind, "--cache-dir", cfg.run.cache_dir)


def require_cache(cfg) -> dict:
    """The manifest of the stage's cache (``stage_cache``), of the kind it takes; an error names the option."""
    from pipeline.cache import require_kind

    path, kind, option, typed = stage_cache(cfg)
    return require_kind(path, kind, option, typed=typed)


def holds_heads(train):
    """``train(cfg, ...)`` run holding ``cfg.run.heads_dir`` (one writer per heads folder), taken before it reads
    anything: a second training into the same folder is refused at once. It runs with denormals flushed to zero
    (``flush_denormals``), set before its first torch operation so that torch's worker threads start with it."""
    @functools.wraps(train)
    def holding(cfg, *args, **kwargs):
        check_heads_dir(cfg)
        with heads_writer(cfg.run.heads_dir), flush_denormals():
            return train(cfg, *args, **kwargs)

    return holding


def check_heads_dir(cfg) -> None:
    """The output rule (pipeline.outputs) for --heads-dir: a folder training adds its two files to, never inside the
    cache it reads, never a device or a place that cannot be written."""
    path, _, option, _ = stage_cache(cfg)
    check_output(cfg.run.heads_dir, "--heads-dir", PARTS, inputs=[(option, path)])


@holds_heads
def train_value_head(cfg: ValueHeadConfig) -> dict:
    """Stage 1 from the ratings cache into ``cfg.run.heads_dir``; returns a summary dict."""
    from pipeline.train import fit_value_head

    path = ratings_cache(cfg)
    require_cache(cfg)
    rows, labels, _, manifest = feature_rows(path, cfg.run, pairs=False)
    names = list(manifest.get("label_names") or ATTRIBUTES)
    t0 = time.perf_counter()
    fit = fit_value_head(rows, labels, cfg, names)
    meta = HeadsMeta(attributes=names, hidden_size=fit.heads.d, architecture=fit.heads.architecture,
                     value_head=stage_record(cfg, fit, CacheIdentity.of(path, manifest)),
                     label_scaling=fit.label_scaling, sigma_calibration=fit.calibration)
    save_heads(cfg.run.heads_dir, fit.heads, meta)
    return {"heads_dir": cfg.run.heads_dir, "rows": rows.n, "epochs_run": len(fit.history),
            "best_epoch": fit.best_epoch, "seconds": time.perf_counter() - t0, "val": fit.val}


def pair_margins(path: str, margin: torch.Tensor) -> torch.Tensor:
    """Each pair's margin for the margin-aware loss; every pair must have one."""
    missing = int(torch.isnan(margin).sum())
    if missing:
        raise UserError(f"{path}: {missing} of {len(margin)} pairs have no margin, which --use-margin needs "
                        "(UltraFeedback's scores, or a `margin` column in the data); train without --use-margin")
    return margin


@holds_heads
def train_gating(cfg: GatingConfig) -> dict:
    """Stage 2 from the preference cache; adds the gate to the heads in ``cfg.run.heads_dir``."""
    from pipeline.train import fit_gate

    path = preferences_cache(cfg)
    manifest = require_cache(cfg)
    value, meta = load_heads(cfg.run.heads_dir)
    identity = CacheIdentity.of(path, manifest)
    check_same_backbone(meta.value_head.cache, identity, cfg.run.heads_dir)
    rows, _, margin, _ = feature_rows(path, cfg.run, pairs=True)
    margin = pair_margins(path, margin) if cfg.use_margin else None
    t0 = time.perf_counter()
    try:
        fit = fit_gate(rows, None, value, cfg, meta.attributes, margin)
    except NoPreference as e:  # the pairs' own fault: name them
        raise NoPreference(f"{path}: {e}") from None
    save_heads(cfg.run.heads_dir, fit.heads, dataclasses.replace(meta, gating=stage_record(cfg, fit, identity),
                                                                pair_calibration=fit.calibration))
    return {"heads_dir": cfg.run.heads_dir, "pairs": rows.n,
            "epochs_run": len(fit.history), "best_epoch": fit.best_epoch,
            "seconds": time.perf_counter() - t0, "val": fit.val}


def train_heads(value_cfg: ValueHeadConfig, gating_cfg: GatingConfig) -> list[dict]:
    """Stage 1 then stage 2 (`urm train-heads`), the heads folder(s) held throughout, so that no other training
    comes between; both caches' kinds and the preference cache's checksums are checked first, so a wrong or
    damaged one stops the run before stage 1 spends its time."""
    from pipeline.cache import verify_cache

    for cfg in (value_cfg, gating_cfg):
        check_heads_dir(cfg)
    with holding_heads(value_cfg, gating_cfg):
        require_cache(value_cfg)
        require_cache(gating_cfg)
        if gating_cfg.run.verify:
            verify_cache(preferences_cache(gating_cfg))
        return [train_value_head(value_cfg), train_gating(gating_cfg)]


@contextlib.contextmanager
def holding_heads(*configs):
    """Hold the heads folder of every stage config (one writer per folder; the same folder twice is held once)."""
    with contextlib.ExitStack() as stack:
        for cfg in configs:
            stack.enter_context(heads_writer(cfg.run.heads_dir))
        yield
