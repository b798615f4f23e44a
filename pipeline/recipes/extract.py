"""`urm extract`: run the frozen backbone once over the datasets and cache last-token hidden states.

The wiring (docs/method.md 5): resolve the datasets (the preset's, or one ``--source``), open the backbone
once (config and tokenizer: cheap), open each dataset's cache (refusing one made with other
settings), and only when some part is still missing load the weights; then per missing part:
render, drop too-long rows, embed in token-budget batches, write the part atomically. A run killed
at any moment resumes where it stopped.

Under torchrun (``pipeline.features.distributed``) every rank loads the rows and tokenises the missing parts
to count their tokens; rank 0 opens the cache while the others wait; each rank writes its share of
the missing parts (``rows.balance_parts``: disjoint, about equal tokens) on cuda:LOCAL_RANK; after
the last rank is done, rank 0 merges the ranks' journals into the manifest and marks it complete.
Parts are the same row ranges as in a single process, each embedded on its own, so the cache is
the same one.

``--engine vllm`` runs the backbone in vLLM's pooling runner (``pipeline.features.vllm_engine``) instead of our
loop: the same rows, token ids, parts and cache; the engine and its version go into the cache's identity
(``extra.engine``), so a cache is finished by the engine that began it. Under torchrun each rank runs its own
engine on its own GPUs.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import progress_shown
from pipeline.configs import ConfigError, DatasetSpec, ExtractConfig
from pipeline.errors import DataError
from pipeline.features import Ranks
from pipeline.outputs import PARTS, check_output

logger = logging.getLogger(__name__)


@dataclass
class ExtractStats:
    """What a run did, for the closing summary and the benchmark."""

    rows: int = 0
    dropped: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # tokens the backbone processed, padding included
    cached_tokens: int = 0  # --engine vllm: prompt tokens prefix caching did not compute again
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

    def __init__(self, cfg: ExtractConfig, ranks: Ranks = Ranks()):
        self.cfg, self.ranks, self._files, self._backbone = cfg, ranks, None, None

    @property
    def files(self):
        from pipeline.features import open_backbone

        if self._files is None:
            self._files = open_backbone(self.cfg.backbone, self.cfg.revision)
        return self._files

    @property
    def compute_dtype(self) -> str:
        """The dtype the weights will run in ("float32", "bfloat16", ...), known before they load: it is part
        of what makes the features, so the cache records it and refuses to mix two."""
        from pipeline.device import resolve_device, resolve_dtype

        return str(resolve_dtype(self.cfg.dtype, resolve_device(self.cfg.device))).removeprefix("torch.")

    @property
    def engine_identity(self) -> dict:
        """What the cache's ``extra`` records of the engine: nothing for hf (as every cache made before the vllm
        engine existed), the engine and its version for vllm (a cache is finished by the engine that began it)."""
        if self.cfg.engine == "hf":
            return {}
        from pipeline.features.vllm_engine import require_vllm

        return {"engine": "vllm", "engine_version": require_vllm()}

    @property
    def engine_info(self) -> dict:
        """The engine and its version, for the finished manifest's ``info`` (either engine)."""
        import importlib.metadata

        if self.cfg.engine == "hf":
            return {"engine": "hf", "engine_version": "transformers " + importlib.metadata.version("transformers")}
        return self.engine_identity

    def load(self):
        if self._backbone is None:
            c = self.cfg
            if c.engine == "vllm":
                from pipeline.features.vllm_engine import VllmBackbone, VllmSettings

                settings = VllmSettings(dtype=self.compute_dtype, max_model_len=c.max_length,
                                        max_num_batched_tokens=c.max_tokens_per_batch,
                                        gpu_memory_utilization=c.gpu_memory_utilization,
                                        tensor_parallel_size=c.tensor_parallel_size, prefix_caching=c.prefix_caching,
                                        enforce_eager=c.enforce_eager, device=c.device,
                                        worker_process=self.ranks.distributed)
                self._backbone = VllmBackbone(self.files, settings)
            else:
                from pipeline.features import load_weights

                self._backbone = load_weights(self.files, c.dtype, c.device, c.attn_implementation)
        return self._backbone

    def embed(self, id_lists, on_batch, paired: bool = False):
        """h and base scores of ``id_lists`` (``paired``: chosen, rejected, ...) through the loaded engine
        (``features.embed_all`` for hf)."""
        from pipeline.features import embed_all

        model = self.load()
        if self.cfg.engine == "vllm":
            return model.embed_all(id_lists, on_batch=on_batch, paired=paired)
        return embed_all(model, id_lists, self.cfg.max_tokens_per_batch, on_batch)

    def close(self) -> None:
        """Stop the vLLM engine, if one was started (the HF model is freed with this object)."""
        if self._backbone is not None and hasattr(self._backbone, "close"):
            self._backbone.close()
        self._backbone = None


def select_datasets(cfg: ExtractConfig, names=None) -> list[DatasetSpec]:
    """The datasets to extract: ``cfg.source`` alone, else the preset's (all, or the named ones)."""
    if cfg.source is not None:
        from pipeline.data import source_label

        name = cfg.name or source_label(cfg.source).replace("/", "__").replace(":", "-")
        return [DatasetSpec(name=name, kind=cfg.kind, source=cfg.source, format=cfg.format)]
    if not cfg.datasets:
        raise ConfigError("the preset defines no [datasets.NAME] tables; give --source and --kind")
    unknown = [n for n in names or [] if n not in cfg.datasets]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {unknown}; the preset has {sorted(cfg.datasets)}")
    return [cfg.datasets[n] for n in (names or cfg.datasets)]


def load_rows(spec: DatasetSpec, skip_invalid: bool, limit: int | None, report: bool = True):
    """Load a dataset's records, log the load report, flatten them into Rows; returns (rows, the load report).

    Data without signal is refused here, before the backbone loads: pairs whose chosen is identical to their
    rejected are dropped (and counted), a file of nothing else is refused, and so is a ratings file without any
    rating."""
    from pipeline.data import drop_identical, load_preferences, load_ratings, require_labels
    from pipeline.features import pair_rows, rating_rows

    if spec.kind == "ratings":
        records, loaded = load_ratings(spec.source, format=spec.format, split=spec.split, skip_invalid=skip_invalid,
                                       limit=limit)
        rows = rating_rows(require_labels(records, loaded))
    else:
        records, loaded = load_preferences(spec.source, format=spec.format, split=spec.split,
                                           skip_invalid=skip_invalid, limit=limit)
        rows = pair_rows(drop_identical(records, loaded))
    if report:
        logger.info(loaded.summary())
    return rows, loaded


def extract_dataset(backbone: LazyBackbone, spec: DatasetSpec, cfg: ExtractConfig,
                    ranks: Ranks = Ranks()) -> ExtractStats:
    """Extract one dataset into ``cfg.cache_dir/spec.name``; complete parts are kept and skipped."""
    from pipeline.cache import CacheSpec, open_writer
    from pipeline.data import fingerprint, pin_revision
    from pipeline.features import chat_template_hash, from_main, part_bounds

    limit = cfg.limit if cfg.limit is not None else spec.limit
    # A hub dataset is read at the commit the Hub resolves now, and that commit is part of the cache's identity:
    # an upstream change gives another cache, not a stale one (offline: as asked, as before). Rank 0 asks.
    source, commit = from_main(ranks, lambda: pin_revision(spec.source, spec.revision))
    rows, loaded = load_rows(dataclasses.replace(spec, source=source, revision=None), cfg.skip_invalid, limit,
                             report=ranks.is_main)
    if not len(rows):
        raise DataError(spec.source, None, None, f"no rows to extract for dataset {spec.name!r}: nothing was cached")
    files = backbone.files
    if cfg.engine == "vllm":
        require_positions(files.config, cfg)
    elif ranks.is_main:
        warn_positions(files.config, cfg)
    paired = spec.kind == "preferences"
    cache_spec = CacheSpec(
        backbone=cfg.backbone, backbone_revision=files.revision, hidden_size=files.hidden_size,
        storage_dtype=cfg.storage_dtype, max_length=cfg.max_length,
        chat_template_hash=chat_template_hash(files.tokenizer), dataset=spec.source,
        dataset_fingerprint=fingerprint(source, split=spec.split, format=spec.format, limit=limit),
        kind=spec.kind, extra={"part_rows": cfg.part_rows, "compute_dtype": backbone.compute_dtype,
                               **backbone.engine_identity,
                               **({"dataset_revision": commit} if commit else {}),
                               # the rows differ from what this loader read before it dropped such pairs
                               **({"identical_pairs_dropped": len(loaded.identical_pairs)}
                                  if loaded.identical_pairs else {})},
    )
    path = Path(cfg.cache_dir) / spec.name
    bounds = part_bounds(len(rows), cfg.part_rows, paired)
    read = source_read(source, spec, limit)
    if ranks.distributed:
        return extract_on_ranks(backbone, spec, cfg, rows, bounds, cache_spec, path, ranks, read)
    refuse_other_engine(path, cfg)
    begun = path.is_dir()
    with open_writer(path, cache_spec, overwrite=cfg.overwrite, n_parts=len(bounds), verify=cfg.verify) as writer:
        try:
            todo = [i for i in range(len(bounds)) if not writer.part_done(i)]
            stats = write_parts(backbone, spec, cfg, rows, bounds, todo, writer)
            stats.parts_skipped = len(bounds) - len(todo)
            return finish(writer, spec, cfg, rows, bounds, stats, path, {**read, **backbone.engine_info})
        except BaseException:
            if not begun:  # this run made the folder, and still holds its lock
                from pipeline.cache import remove_unbegun

                remove_unbegun(path)
            raise


def extract_on_ranks(backbone: LazyBackbone, spec: DatasetSpec, cfg: ExtractConfig, rows, bounds, cache_spec,
                     path: Path, ranks: Ranks, read: dict) -> ExtractStats:
    """One dataset under torchrun: rank 0 opens the cache, every rank writes its share of the missing
    parts, and once all are done rank 0 merges their journals and finishes (see the module docstring)."""
    from pipeline.cache import open_rank_writer, open_writer
    from pipeline.features import balance_parts, from_main, gather

    writer = None

    def open_cache() -> dict:
        nonlocal writer
        refuse_other_engine(path, cfg)
        writer = open_writer(path, cache_spec, overwrite=cfg.overwrite, n_parts=len(bounds), verify=cfg.verify)
        return writer.manifest

    manifest = from_main(ranks, open_cache)  # the others wait: rank 0 alone checks and cleans the folder
    try:
        done = {int(p["index"]) for p in manifest["parts"]}
        todo = [i for i in range(len(bounds)) if i not in done]
        tokens = part_tokens(backbone.files.tokenizer, rows, bounds, todo, cfg.max_length, spec.kind == "preferences")
        mine = [todo[j] for j in balance_parts(tokens, ranks.world_size)[ranks.rank]]
        stats = write_parts(backbone, spec, cfg, rows, bounds, mine, open_rank_writer(path, cache_spec, manifest,
                                                                                        ranks.rank), ranks)
        everyone = gather(ranks, stats)  # waits for the last rank's last part
        if not ranks.is_main:
            return stats
        total = ExtractStats(parts_skipped=len(done), seconds=max(s.seconds for s in everyone),
                             **{k: sum(getattr(s, k) for s in everyone)
                                for k in ("tokens", "padded_tokens", "cached_tokens", "parts_written")})
        writer.merge_journals()
        return finish(writer, spec, cfg, rows, bounds, total, path, {**read, **backbone.engine_info})
    finally:
        if writer is not None:
            writer.close()


def part_tokens(tokenizer, rows, bounds, parts: list[int], max_length: int, paired: bool) -> list[int]:
    """Tokens each of ``parts`` will run through the backbone (its rows that fit max_length): the cost
    by which torchrun ranks share the parts. Every rank computes the same numbers."""
    from pipeline.features import keep_mask, render_ids

    counts = []
    for i in parts:
        lengths = np.array([len(x) for x in render_ids(tokenizer, rows.take(range(*bounds[i])).conversations)])
        counts.append(int(lengths[keep_mask(lengths, max_length, paired)].sum()))
    return counts


def write_parts(backbone: LazyBackbone, spec: DatasetSpec, cfg: ExtractConfig, rows, bounds, todo: list[int],
                writer, ranks: Ranks = Ranks()) -> ExtractStats:
    """Parts ``todo`` of one cache: render, drop too-long rows, embed, write each with ``writer``.

    The progress bar counts this process's rows; under torchrun only rank 0 shows one.
    """
    from tqdm.auto import tqdm

    from pipeline.data import source_label
    from pipeline.features import keep_mask, render_ids

    paired = spec.kind == "preferences"
    stats = ExtractStats()
    label = source_label(spec.source)
    if todo:
        model = backbone.load()
        cached_before = getattr(model, "cached_tokens", 0)
        started = time.perf_counter()
        desc = f"extract {spec.name}" + (f" ({ranks}, its share)" if ranks.distributed else "")
        bar = tqdm(total=sum(bounds[i][1] - bounds[i][0] for i in todo), unit="row", desc=desc,
                   dynamic_ncols=True, disable=not (ranks.is_main and progress_shown()))

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
                emb, scores = backbone.embed(kept_ids, on_batch, paired)
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
            stats.cached_tokens = getattr(model, "cached_tokens", 0) - cached_before
    return stats


def finish(writer, spec: DatasetSpec, cfg: ExtractConfig, rows, bounds, stats: ExtractStats, path: Path, info: dict):
    """Mark the cache complete (refusing an empty one), recording ``info`` (how its rows were read, the engine), and
    write the closing summary line."""
    if writer.manifest["rows"] == 0:  # every row longer than max_length: an empty cache would train nothing
        raise DataError(spec.source, None, None, f"all {stats.dropped or len(rows)} rows are longer than max_length="
                        f"{cfg.max_length} tokens: nothing to cache; raise --max-length")
    manifest = writer.finish(len(bounds), info)
    stats.rows, stats.dropped = manifest["rows"], manifest["dropped_rows"]
    # The command's own output (what it cached), not a log line: stdout, as soon as the dataset is done, --quiet or not
    sys.stdout.write(summary_line(spec.name, path, stats, cfg.max_length) + "\n")
    sys.stdout.flush()
    return stats


def source_read(source: str, spec: DatasetSpec, limit: int | None) -> dict:
    """How the rows were read (manifest ``info``, not compared on resume): the source as read (a hub dataset pinned
    to its commit), split, format and limit, which `urm curate` reads again after checking that their fingerprint
    is still the manifest's ``dataset_fingerprint``."""
    return {"source_read": {"source": source, "split": spec.split, "format": spec.format, "limit": limit}}


def summary_line(name: str, path: Path, stats: ExtractStats, max_length: int) -> str:
    line = (f"{name}: {stats.rows} rows cached in {path} ({stats.parts_written} parts written, "
            f"{stats.parts_skipped} already complete); {stats.dropped} rows dropped as longer than "
            f"max_length={max_length}")
    if stats.parts_written:
        line += (f"; {stats.tokens} tokens in {stats.seconds:.1f} s = {stats.tokens_per_s:.0f} tok/s, "
                 f"padding {stats.padding_share:.1%}")
        if stats.cached_tokens:
            line += f", prefix cache reused {stats.cached_tokens / stats.tokens:.1%} of the tokens"
    return line


def refuse_other_engine(path: Path, cfg: ExtractConfig) -> None:
    """A cache is finished by the engine that began it: one begun by the other engine is refused in one line
    (unless --overwrite). The two agree to ~1e-4 in float32 and less in bf16, so a mixed cache would hold rows
    of two slightly different feature maps, and proving them equivalent would cost re-extracting them."""
    from pipeline.cache import MANIFEST, CacheMismatch, read_manifest

    if cfg.overwrite or not (path / MANIFEST).is_file():
        return
    begun = (read_manifest(path).get("extra") or {}).get("engine", "hf")
    if begun != cfg.engine:
        raise CacheMismatch(f"{path} was begun with --engine {begun}; this run has --engine {cfg.engine}: a cache is "
                            f"finished by the engine that began it (their features differ slightly); run again with "
                            f"--engine {begun}, or pass --overwrite to extract it anew with {cfg.engine}")


def require_positions(config, cfg: ExtractConfig) -> None:
    """--engine vllm reads at most the backbone's positions (vLLM refuses a longer max_model_len)."""
    from pipeline.features.vllm_engine import EngineError

    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.max_length > positions:
        raise EngineError(f"--max-length {cfg.max_length} is more than the {positions} positions of the backbone "
                          f"(max_position_embeddings), which vLLM does not run past: give --max-length {positions} "
                          "or less, or use --engine hf")


def warn_positions(config, cfg: ExtractConfig) -> None:
    """Say so when ``--max-length`` is more than the backbone's positions: rows that long run past what it was
    trained on (they are kept, as asked: a backbone may extrapolate; the heads never see a longer row than this)."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.max_length > positions:
        logger.warning(f"warning: --max-length {cfg.max_length} is more than the {positions} positions of the "
                       f"backbone (max_position_embeddings): rows between {positions} and {cfg.max_length} tokens run "
                       f"past what it was trained on; --max-length {positions} or less keeps to them")


def run_extract(cfg: ExtractConfig, names=None) -> dict[str, ExtractStats]:
    """Extract the preset's datasets (or the named ones, or ``cfg.source``) with one backbone.

    Under torchrun (WORLD_SIZE > 1) the ranks share each dataset's parts; rank 0's stats are the run's
    totals, each other rank's its own share.
    """
    from pipeline.features import distributed

    ranks = distributed.ranks_from_env()
    if cfg.engine == "vllm":
        from pipeline.features.vllm_engine import require_vllm, select_rank_gpus

        require_vllm()  # at once, before any data or weights load
        if ranks.distributed:  # before anything starts CUDA in this process
            select_rank_gpus(ranks.local_rank, cfg.tensor_parallel_size)
    datasets = select_datasets(cfg, names)
    for spec in datasets:  # the output rule (pipeline.outputs), before the backbone opens
        check_output(Path(cfg.cache_dir) / spec.name, "--cache-dir", PARTS,
                     inputs=[("--backbone", cfg.backbone), ("the dataset source", spec.source)])
    if ranks.distributed and cfg.engine == "hf":
        cfg = dataclasses.replace(cfg, device=distributed.rank_device(cfg.device, ranks))
    backbone = LazyBackbone(cfg, ranks)
    distributed.start(ranks)
    try:
        stats = {spec.name: extract_dataset(backbone, spec, cfg, ranks) for spec in datasets}
        distributed.barrier(ranks)  # rank 0 finishes the last manifest while the others wait, in the group
        return stats
    finally:
        backbone.close()
        distributed.stop(ranks)
