"""`urm export`: stitch trained heads onto the backbone as a Hugging Face model directory.

The wiring: read the heads folder, open the backbone they were trained on (or the one named),
refuse a mismatch (hidden size, weights revision, chat template), then build the directory in a
temporary folder beside ``out_dir`` (pipeline.export.model_dir: shards linked or rewritten, merged index,
config.json, the shipped code, tokenizer, model card, heads.json, urm_export.json with the xxh3-128
of every other file, which `urm score` verifies) and rename it
into place, so a failed export leaves nothing behind. A GGUF backbone is exported from its
converted safetensors copy (pipeline.features.backbone.convert_gguf).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

from safetensors import safe_open

from pipeline import __version__
from pipeline.atomic import atomic_directory
from pipeline.configs import ExportConfig, to_dict
from pipeline.export import (HEADS_SHARD, ExportError, check_heads_fit, check_tokenizer_round_trip,
                             export_checksums, place_shards, plan_shards, urm_section, write_code, write_config,
                             write_index, write_tokenizer)
from pipeline.model import META, HeadsError, copy_heads, heads_reader, load_heads
from pipeline.outputs import FOLDER, check_output

logger = logging.getLogger(__name__)


def export_model(cfg: ExportConfig) -> dict:
    """Write the Hugging Face model directory ``cfg.out_dir``; returns what was done (urm_export.json).

    The heads folder is held with its shared lock (``heads_reader``) from the first read of the heads until their
    copy into the export is checked against the heads.json copied with it (``copy_heads``): a training cannot save
    in between, and one already writing refuses the export, so an export never holds a torn pair."""
    from pipeline.export import model_card
    from pipeline.features import chat_template_hash, checkpoint_dir, is_reward_model, open_backbone

    t0 = time.perf_counter()
    heads_dir, out = Path(cfg.heads_dir), Path(cfg.out_dir)
    check_output(out, "--out-dir", FOLDER, inputs=[("--heads-dir", heads_dir), ("--backbone", cfg.backbone)],
                 overwrite=cfg.overwrite)  # before anything loads; again below once the backbone's folder is known
    with contextlib.ExitStack() as reading:
        reading.enter_context(heads_reader(heads_dir))
        _, meta = load_heads(heads_dir)  # the tensors are checked against heads.json
        spec = cfg.backbone or meta.value_head.cache.backbone
        if not spec:
            raise ExportError(f"{heads_dir / META} names no backbone (value_head.cache.backbone); pass --backbone")
        files = open_backbone(spec, cfg.revision)
        template = chat_template_hash(files.tokenizer)
        check_heads_fit(meta, files, template, heads_dir)
        directory = checkpoint_dir(files.path, cfg.revision)
        check_output(out, "--out-dir", FOLDER, inputs=[("--heads-dir", heads_dir), ("the backbone", directory)],
                     overwrite=cfg.overwrite)
        reward_model = is_reward_model(files.config)
        plan = plan_shards(directory, files.config, reward_model)
        if plan.extra:
            logger.info(f"not used by the reward model (left in the shards, ignored on load): "
                        f"{', '.join(plan.extra[:5])}" + (" ..." if len(plan.extra) > 5 else ""))
        base_bias = any(v == "base_score.bias" for m in plan.files.values() for v in m.values())
        with atomic_directory(out) as tmp:
            copied = copy_heads(heads_dir, tmp / HEADS_SHARD, tmp / META)  # heads.json and its tensors, one pair
            if copied.checksum != meta.checksum:  # cannot happen while the lock is held; never exported if it does
                raise HeadsError(f"{heads_dir}: the heads changed while the export read them; export again")
            reading.close()  # the export has its heads: a training may start now
            shards = place_shards(directory, plan, tmp, cfg.link)
            with safe_open(str(tmp / HEADS_SHARD), framework="pt") as f:
                heads_keys = list(f.keys())
            write_index(tmp, plan, heads_keys)
            config_json = write_config(files.config, urm_section(meta, reward_model, base_bias), tmp)
            write_code(files.config, tmp)
            write_tokenizer(files.tokenizer, directory, tmp)
            check_tokenizer_round_trip(tmp, template, files.config)
            record = {"format_version": 1, "pipeline_version": __version__, "config": to_dict(cfg),
                      "backbone": {"spec": spec, "path": str(directory), "revision": files.revision,
                                   "chat_template_hash": template, "reward_model": reward_model},
                      "heads_dir": str(heads_dir), "shards": shards, "unused_tensors": plan.extra}
            (tmp / "README.md").write_text(model_card(meta, record, config_json["urm"],
                                                      config_json["architectures"][0], trained_on(meta)))
            record["checksums"] = export_checksums(tmp)
            record["seconds"] = time.perf_counter() - t0
            (tmp / "urm_export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return {**record, "out_dir": str(out)}


def trained_on(meta) -> list[str]:
    """The dataset sources of the caches the heads were trained on (their manifests' ``dataset``), where readable."""
    from pipeline.cache import CacheError, read_manifest

    sources = []
    for stage in (s for s in (meta.value_head, meta.gating) if s is not None):
        try:
            sources.append(read_manifest(Path(stage.cache.path)).get("dataset"))
        except CacheError:  # the cache moved or was deleted since: the card goes without it
            continue
    return [s for s in sources if isinstance(s, str)]


def summary(record: dict) -> str:
    """One line for the CLI."""
    counts = {}
    for how in record["shards"].values():
        counts[how] = counts.get(how, 0) + 1
    shards = ", ".join(f"{n} {how}" for how, n in sorted(counts.items()))
    return (f"exported {record['out_dir']} in {record['seconds']:.1f} s (backbone shards: {shards}; "
            f"heads from {record['heads_dir']}). Load it with AutoModelForSequenceClassification."
            f"from_pretrained({record['out_dir']!r}, trust_remote_code=True), or `urm score {record['out_dir']} -i FILE`")
