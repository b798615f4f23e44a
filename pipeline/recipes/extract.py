"""`urm extract`: run the frozen backbone once over the datasets and cache last-token hidden states.

The wiring (METHOD.md 5): resolve the datasets (the preset's, or one ``--source``), open the backbone
once (config and tokenizer: cheap), open each dataset's cache (refusing one made with other
settings), and only when some part is still missing load the weights; then per missing part:
render, drop too-long rows, embed in token-budget batches, write the part atomically. A run killed
at any moment resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, DatasetSpec, ExtractConfig
from pipeline.records import DataError


@dataclass
class ExtractStats:
    """What a run did, for the closing summary and the benchmark."""

    rows: int = 0
    dropped: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # tokens the backbone processed, padding included
    parts_written: int = 0
    parts_skipped: int = 0
    seconds: float = 0.0

    @property
    def padding_share(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class LazyBackbone:
    """The backbone opened once (tokenizer and revision now), its weights loaded only when a part needs them."""

    def __init__(self, cfg: ExtractConfig):
        self.cfg, self._files, self._backbone = cfg, None, None

    @property
    def files(self):
        from pipeline.backbone import open_backbone

        if self._files is None:
            self._files = open_backbone(self.cfg.backbone, self.cfg.revision)
        return self._files

    @property
    def compute_dtype(self) -> str:
        """The dtype the weights will run in ("float32", "bfloat16", ...), known before they load: it is part
        of what makes the features, so the cache records it and refuses to mix two."""
        from pipeline.backbone import resolve_device, resolve_dtype

        return str(resolve_dtype(self.cfg.dtype, resolve_device(self.cfg.device))).removeprefix("torch.")

    def load(self):
        from pipeline.backbone import load_weights

        if self._backbone is None:
            c = self.cfg
            self._backbone = load_weights(self.files, c.dtype, c.device, c.attn_implementation)
        return self._backbone


def select_datasets(cfg: ExtractConfig, names=None) -> list[DatasetSpec]:
    """The datasets to extract: ``cfg.source`` alone, else the preset's (all, or the named ones)."""
    if cfg.source is not None:
        from pipeline.sources import source_label

        name = cfg.name or source_label(cfg.source).replace("/", "__").replace(":", "-")
        return [DatasetSpec(name=name, kind=cfg.kind, source=cfg.source, format=cfg.format)]
    if not cfg.datasets:
        raise ConfigError("the preset defines no [datasets.NAME] tables; give --source and --kind")
    unknown = [n for n in names or [] if n not in cfg.datasets]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {unknown}; the preset has {sorted(cfg.datasets)}")
    return [cfg.datasets[n] for n in (names or cfg.datasets)]


def load_rows(spec: DatasetSpec, skip_invalid: bool, limit: int | None):
    """Load a dataset's records, print the load report, flatten them into Rows."""
    from pipeline.preferences import load_preferences
    from pipeline.ratings import load_ratings
    from pipeline.rows import pair_rows, rating_rows

    if spec.kind == "ratings":
        records, report = load_ratings(spec.source, format=spec.format, split=spec.split, skip_invalid=skip_invalid,
                                       limit=limit)
        rows = rating_rows(records)
    else:
        records, report = load_preferences(spec.source, format=spec.format, split=spec.split,
                                           skip_invalid=skip_invalid, limit=limit)
        rows = pair_rows(records)
    print(report.summary())
    return rows


def extract_dataset(backbone: LazyBackbone, spec: DatasetSpec, cfg: ExtractConfig) -> ExtractStats:
    """Extract one dataset into ``cfg.cache_dir/spec.name``; complete parts are kept and skipped."""
    from pipeline.cache import CacheSpec, open_writer
    from pipeline.render import chat_template_hash
    from pipeline.rows import part_bounds
    from pipeline.sources import fingerprint

    limit = cfg.limit if cfg.limit is not None else spec.limit
    rows = load_rows(spec, cfg.skip_invalid, limit)
    if not len(rows):
        raise DataError(spec.source, None, None, f"no rows to extract for dataset {spec.name!r}: nothing was cached")
    files = backbone.files
    paired = spec.kind == "preferences"
    cache_spec = CacheSpec(
        backbone=cfg.backbone, backbone_revision=files.revision, hidden_size=files.hidden_size,
        storage_dtype=cfg.storage_dtype, max_length=cfg.max_length,
        chat_template_hash=chat_template_hash(files.tokenizer), dataset=spec.source,
        dataset_fingerprint=fingerprint(spec.source, split=spec.split, format=spec.format, limit=limit),
        kind=spec.kind, extra={"part_rows": cfg.part_rows, "compute_dtype": backbone.compute_dtype},
    )
    path = Path(cfg.cache_dir) / spec.name
    bounds = part_bounds(len(rows), cfg.part_rows, paired)
    with open_writer(path, cache_spec, overwrite=cfg.overwrite, n_parts=len(bounds), verify=cfg.verify) as writer:
        return write_parts(backbone, spec, cfg, rows, bounds, writer, path)


def write_parts(backbone: LazyBackbone, spec: DatasetSpec, cfg: ExtractConfig, rows, bounds, writer, path: Path):
    """The missing parts of one cache: render, drop too-long rows, embed, write; then mark it complete."""
    from tqdm.auto import tqdm

    from pipeline.embedding import embed_all
    from pipeline.render import render_ids
    from pipeline.rows import keep_mask
    from pipeline.sources import source_label

    paired = spec.kind == "preferences"
    todo = [i for i in range(len(bounds)) if not writer.part_done(i)]
    stats = ExtractStats(parts_skipped=len(bounds) - len(todo))
    label = source_label(spec.source)
    if todo:
        model = backbone.load()
        started = time.perf_counter()
        bar = tqdm(total=sum(bounds[i][1] - bounds[i][0] for i in todo), unit="row",
                   desc=f"extract {spec.name}", dynamic_ncols=True)

        def on_batch(n, tokens, padded):
            stats.tokens += tokens
            stats.padded_tokens += padded
            bar.update(n)
            bar.set_postfix(tok_s=f"{stats.tokens / (time.perf_counter() - started):.0f}",
                            pad=f"{stats.padding_share:.1%}", refresh=False)

        try:
            for i in todo:
                a, b = bounds[i]
                part = rows.take(range(a, b))
                ids = render_ids(model.tokenizer, part.conversations)
                keep = keep_mask(np.array([len(x) for x in ids]), cfg.max_length, paired)
                bar.update(int((~keep).sum()))
                kept = part.take(np.flatnonzero(keep))
                kept_ids = [x for x, k in zip(ids, keep) if k]
                emb, scores = embed_all(model, kept_ids, cfg.max_tokens_per_batch, on_batch)
                writer.write_part(i, {
                    "id": kept.id, "source": [label] * len(kept), "subset": kept.subset,
                    "pair_id": kept.pair_id, "role": kept.role, "margin": kept.margin,
                    "n_tokens": np.array([len(x) for x in kept_ids], dtype=np.int32),
                    "embedding": emb, "labels": kept.labels, "base_score": scores,
                }, dropped=int((~keep).sum()))
                stats.parts_written += 1
        finally:
            bar.close()
            stats.seconds = time.perf_counter() - started
    if writer.manifest["rows"] == 0:  # every row longer than max_length: an empty cache would train nothing
        raise DataError(spec.source, None, None, f"all {stats.dropped or len(rows)} rows are longer than max_length="
                        f"{cfg.max_length} tokens: nothing to cache; raise --max-length")
    manifest = writer.finish(len(bounds))
    stats.rows, stats.dropped = manifest["rows"], manifest["dropped_rows"]
    print(summary_line(spec.name, path, stats, cfg.max_length))
    return stats


def summary_line(name: str, path: Path, stats: ExtractStats, max_length: int) -> str:
    line = (f"{name}: {stats.rows} rows cached in {path} ({stats.parts_written} parts written, "
            f"{stats.parts_skipped} already complete); {stats.dropped} rows dropped as longer than "
            f"max_length={max_length}")
    if stats.parts_written:
        line += (f"; {stats.tokens} tokens in {stats.seconds:.1f} s = {stats.tokens_per_s:.0f} tok/s, "
                 f"padding {stats.padding_share:.1%}")
    return line


def run_extract(cfg: ExtractConfig, names=None) -> dict[str, ExtractStats]:
    """Extract the preset's datasets (or the named ones, or ``cfg.source``) with one backbone."""
    datasets = select_datasets(cfg, names)
    backbone = LazyBackbone(cfg)
    return {spec.name: extract_dataset(backbone, spec, cfg) for spec in datasets}
