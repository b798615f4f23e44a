"""Trained heads from wherever they are kept, and the one check that features fit them.

``load_for_evaluation`` reads heads from a heads folder, from an export's copy of them, or from a checkpoint
in the published URM layout (its value head and gate; the checkpoint is its own backbone). ``check_features``
and ``check_same_backbone`` refuse features from another backbone, chat template or hidden size than the
heads were trained on (``CacheIdentity.feature_differences``), for `urm evaluate`, `urm curate` and stage 2
of training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from pipeline.model.heads_io import EXPORT_TENSORS, CacheIdentity, HeadsError, HeadsMeta, load_heads
from pipeline.model.published import is_published_checkpoint, published_heads


def load_for_evaluation(path: str, checkpoint_identity: Callable[[Path], dict]):
    """(heads, meta, what was loaded) from a heads folder, an export directory (its copy of the heads), or a
    checkpoint in the published URM layout, whose features identity (``backbone_revision``, ``chat_template_hash``)
    ``checkpoint_identity(folder)`` gives: its caches must come from it as backbone."""
    folder = Path(path)
    if is_published_checkpoint(folder):
        heads, meta = published_heads(folder)
        identity = dataclasses.replace(meta.value_head.cache, **checkpoint_identity(folder))
        meta = dataclasses.replace(meta, value_head=dataclasses.replace(meta.value_head, cache=identity))
        return heads, meta, f"published-layout checkpoint {folder} (sigma not calibrated)"
    if (folder / EXPORT_TENSORS).is_file() or (folder / "urm_export.json").is_file():  # an export: its heads copy
        heads, meta = load_heads(folder, tensors=EXPORT_TENSORS)
        return heads, meta, f"export {folder}"
    if not folder.exists():
        raise HeadsError(f"{folder}: no such heads folder or export; train heads (`urm train-heads`) or pass one")
    heads, meta = load_heads(folder)
    return heads, meta, f"heads {folder}"


def check_features(path: Path, manifest: dict, meta: HeadsMeta) -> None:
    """Refuse a cache whose features come from another backbone, template or hidden size than the heads'."""
    trained = meta.value_head.cache
    differences = trained.feature_differences(CacheIdentity.of(path, manifest))
    if differences:
        key = differences[0]
        raise HeadsError(f"{path}: its {key} is {manifest.get(key)!r} but the heads were trained on features with "
                         f"{getattr(trained, key)!r} ({trained.path}); extract it with the heads' backbone")


def check_same_backbone(ratings: CacheIdentity, preferences: CacheIdentity, heads_dir: str) -> None:
    """Refuse a preference cache made with another backbone / template / hidden size than the ratings cache the value
    head was trained on (HeadsError)."""
    differences = ratings.feature_differences(preferences)
    if differences:
        key = differences[0]
        raise HeadsError(
            f"preference cache {preferences.path} differs from the ratings cache {ratings.path} that the "
            f"value head in {heads_dir} was trained on: {key} is {getattr(preferences, key)!r} there but "
            f"{getattr(ratings, key)!r} for the ratings. Extract both caches with the same backbone and chat "
            "template (`urm extract`), or retrain the value head on a matching ratings cache.")
