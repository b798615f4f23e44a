"""Extraction: run the frozen backbone over a dataset and cache each row's last-token hidden state.

METHOD.md section 5. Rows are rendered by ``pipeline.render``; each part of the cache (a fixed,
deterministic slice of the dataset) is embedded in length-sorted batches under a token budget,
right-padded, and the hidden state of the last non-padding position (read off the attention mask,
never the pad id, which may equal EOS) is copied to the host once per batch. A part is written
atomically, so a run killed at any moment resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import ATTRIBUTES
from pipeline.config import ConfigError, DatasetSpec, ExtractConfig

# ----------------------------------------------------------------------------------------------
# Batching math (pure)


def plan_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Indices of each batch: longest rows first, each batch's rows x longest row <= max_tokens.

    Sorting by length keeps padding small; the longest batch comes first so an out-of-memory
    error shows at once. A row longer than the budget gets a batch of its own.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        n = max(1, max_tokens // int(lengths[order[start]]))
        batches.append(order[start : start + n])
        start += n
    return batches


def pad_right(id_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask ([B, L] int64)."""
    longest = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), longest), dtype=torch.long)
    for i, ids in enumerate(id_lists):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return input_ids, mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row of the mask: right or left padding, holes allowed."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(positions.dtype) * positions).argmax(dim=1)


# ----------------------------------------------------------------------------------------------
# One batch on the backbone


@torch.inference_mode()
def embed_batch(backbone, id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray | None]:
    """Last-token hidden states [B, d] (float32) and the backbone's own score [B] (or None)."""
    pad_id = backbone.tokenizer.pad_token_id
    input_ids, mask = pad_right(id_lists, 0 if pad_id is None else pad_id)
    input_ids, mask = input_ids.to(backbone.device), mask.to(backbone.device)
    hidden = backbone.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    h = hidden[torch.arange(len(id_lists), device=hidden.device), last_token_index(mask)]
    out = h.float()
    if backbone.score_head is not None:
        out = torch.cat([out, backbone.score_head(h).float()], dim=1)
    out = out.cpu().numpy()  # the one device -> host copy of the batch
    d = backbone.hidden_size
    return out[:, :d], (out[:, d] if backbone.score_head is not None else None)


def embed_all(backbone, id_lists: list[list[int]], max_tokens: int, on_batch=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Embed rows in token-budget batches; results come back in the input order."""
    lengths = np.array([len(ids) for ids in id_lists])
    emb = np.empty((len(id_lists), backbone.hidden_size), dtype=np.float32)
    scores = np.full(len(id_lists), np.nan, dtype=np.float32) if backbone.score_head is not None else None
    for idx in plan_batches(lengths, max_tokens):
        h, s = embed_batch(backbone, [id_lists[i] for i in idx])
        emb[idx] = h
        if scores is not None:
            scores[idx] = s
        if on_batch is not None:
            on_batch(len(idx), int(lengths[idx].sum()), len(idx) * int(lengths[idx].max()))
    return emb, scores


# ----------------------------------------------------------------------------------------------
# Rows of a dataset, and its parts


@dataclass
class Rows:
    """The rows to embed, flattened: one per rating row, two (chosen, rejected) per pair."""

    id: list[str]
    subset: list[str | None]
    pair_id: list[str | None]
    role: list[str | None]
    conversations: list[list[dict]]
    labels: np.ndarray  # [N, K] float32, NaN = missing

    def __len__(self):
        return len(self.id)

    def take(self, idx) -> "Rows":
        return Rows(
            [self.id[i] for i in idx], [self.subset[i] for i in idx], [self.pair_id[i] for i in idx],
            [self.role[i] for i in idx], [self.conversations[i] for i in idx], self.labels[list(idx)],
        )


def rating_rows(records) -> Rows:
    return Rows(
        id=[r.id for r in records], subset=[None] * len(records), pair_id=[None] * len(records),
        role=[None] * len(records), conversations=[r.messages for r in records],
        labels=np.array([r.labels for r in records], dtype=np.float32).reshape(-1, len(ATTRIBUTES)),
    )


def pair_rows(pairs) -> Rows:
    """Chosen then rejected for each pair, adjacent, in dataset order."""
    rows = Rows([], [], [], [], [], np.full((2 * len(pairs), len(ATTRIBUTES)), np.nan, dtype=np.float32))
    for p in pairs:
        for role, conv in (("chosen", p.chosen), ("rejected", p.rejected)):
            rows.id.append(f"{p.pair_id}:{role}")
            rows.subset.append(p.subset)
            rows.pair_id.append(p.pair_id)
            rows.role.append(role)
            rows.conversations.append(conv)
    return rows


def keep_mask(lengths: np.ndarray, max_length: int, paired: bool) -> np.ndarray:
    """Rows that fit max_length; for pairs, a pair with one side too long is dropped whole."""
    keep = lengths <= max_length
    if paired:
        both = keep[0::2] & keep[1::2]
        keep = np.repeat(both, 2)
    return keep


# ----------------------------------------------------------------------------------------------
# A dataset into its cache


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


def load_rows(spec: DatasetSpec, skip_invalid: bool, limit: int | None):
    """Load a dataset's records, print the load report, flatten them into Rows."""
    from pipeline.preferences import load_preferences
    from pipeline.ratings import load_ratings

    limit = limit if limit is not None else spec.limit
    if spec.kind == "ratings":
        records, report = load_ratings(spec.source, split=spec.split, skip_invalid=skip_invalid, limit=limit)
        rows = rating_rows(records)
    else:
        records, report = load_preferences(spec.source, format=spec.format, split=spec.split,
                                           skip_invalid=skip_invalid, limit=limit)
        rows = pair_rows(records)
    print(report.summary())
    return rows, report


def part_bounds(n_rows: int, part_rows: int, paired: bool) -> list[tuple[int, int]]:
    """Row ranges of the parts; a part never splits a pair."""
    step = max(2, part_rows - part_rows % 2) if paired else max(1, part_rows)
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def extract_dataset(backbone_loader, spec: DatasetSpec, cfg: ExtractConfig, limit: int | None = None) -> ExtractStats:
    """Extract one dataset into ``cfg.cache_dir/spec.name``; complete parts are kept and skipped."""
    from tqdm.auto import tqdm

    from pipeline.cache import CacheSpec, open_writer
    from pipeline.render import chat_template_hash, render_ids
    from pipeline.sources import fingerprint, source_label

    rows, _ = load_rows(spec, cfg.skip_invalid, limit)
    info = backbone_loader.info()
    paired = spec.kind == "preferences"
    cache_spec = CacheSpec(
        backbone=cfg.backbone, backbone_revision=info.revision, hidden_size=info.hidden_size,
        storage_dtype=cfg.storage_dtype, max_length=cfg.max_length,
        chat_template_hash=chat_template_hash(info.tokenizer),
        dataset=spec.source,
        dataset_fingerprint=fingerprint(spec.source, split=spec.split, format=spec.format,
                                        limit=limit if limit is not None else spec.limit),
        kind=spec.kind, extra={"part_rows": cfg.part_rows},
    )
    path = Path(cfg.cache_dir) / spec.name
    bounds = part_bounds(len(rows), cfg.part_rows, paired)
    writer = open_writer(path, cache_spec, overwrite=cfg.overwrite, n_parts=len(bounds))
    todo = [i for i in range(len(bounds)) if not writer.part_done(i)]
    stats = ExtractStats(parts_skipped=len(bounds) - len(todo))
    label = source_label(spec.source)
    if todo:
        backbone = backbone_loader.load()
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
                ids = render_ids(backbone.tokenizer, part.conversations)
                keep = keep_mask(np.array([len(x) for x in ids]), cfg.max_length, paired)
                bar.update(int((~keep).sum()))
                kept = part.take(np.flatnonzero(keep))
                kept_ids = [x for x, k in zip(ids, keep) if k]
                emb, scores = embed_all(backbone, kept_ids, cfg.max_tokens_per_batch, on_batch)
                writer.write_part(i, {
                    "id": kept.id, "source": [label] * len(kept), "subset": kept.subset,
                    "pair_id": kept.pair_id, "role": kept.role,
                    "n_tokens": np.array([len(x) for x in kept_ids], dtype=np.int32),
                    "embedding": emb, "labels": kept.labels, "base_score": scores,
                }, dropped=int((~keep).sum()))
                stats.parts_written += 1
        finally:
            bar.close()
            stats.seconds = time.perf_counter() - started
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


# ----------------------------------------------------------------------------------------------
# Entry point


class LazyBackbone:
    """Tokenizer and revision now (cheap), weights only when some part still needs them."""

    def __init__(self, cfg: ExtractConfig):
        self.cfg, self._info, self._backbone = cfg, None, None

    def info(self):
        from types import SimpleNamespace

        from pipeline.backbone import open_backbone

        if self._info is None:
            path, revision, config, tokenizer = open_backbone(self.cfg.backbone, self.cfg.revision)
            self._info = SimpleNamespace(path=path, revision=revision, tokenizer=tokenizer,
                                         hidden_size=config.hidden_size)
        return self._info

    def load(self):
        from pipeline.backbone import load_backbone

        if self._backbone is None:
            c = self.cfg
            self._backbone = load_backbone(c.backbone, c.revision, c.dtype, c.device, c.attn_implementation)
        return self._backbone


def select_datasets(cfg: ExtractConfig, names=None, source=None, kind=None, name=None, format=None) -> list[DatasetSpec]:
    if source is not None:
        if kind is None:
            raise ConfigError("--source needs --kind ratings or --kind preferences")
        from pipeline.sources import source_label

        return [DatasetSpec(name=name or source_label(source).replace("/", "__").replace(":", "-"),
                            kind=kind, source=source, format=format)]
    if not cfg.datasets:
        raise ConfigError("the preset defines no [datasets.NAME] tables; give --source and --kind")
    unknown = [n for n in names or [] if n not in cfg.datasets]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {unknown}; the preset has {sorted(cfg.datasets)}")
    return [cfg.datasets[n] for n in (names or cfg.datasets)]


def run_extract(cfg: ExtractConfig, names=None, source=None, kind=None, name=None, format=None,
                limit=None) -> dict[str, ExtractStats]:
    """Extract the preset's datasets (or the named ones, or one ad hoc source) with one backbone."""
    datasets = select_datasets(cfg, names, source, kind, name, format)
    backbone = LazyBackbone(cfg)
    return {spec.name: extract_dataset(backbone, spec, cfg, limit) for spec in datasets}
