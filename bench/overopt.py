"""Over-optimisation with a known gold reward: does a conservative reward keep more gold in best-of-n? SmolLM2 features.

DOC_PLACEHOLDER
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import SHARED_DATA, machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]
STEERLM = SHARED_DATA / "steerlm-attributes-sample512.jsonl"
UF_TRAIN = SHARED_DATA / "ultrafeedback-binarized-sample-train.jsonl"
# The response pool: the shortest pairs of each real file (what a 2-core CPU embeds in minutes). "train" sources give
# the proxy's training rows (a seeded share of their pairs) and candidates (the rest); "shift" sources only candidates.
SOURCES = {  # name: (file, pairs, role)
    "hh-rlhf": ("hh-rlhf-harmless-base-test.jsonl.gz", 150, "train"),
    "ultrafeedback": ("ultrafeedback-binarized-sample-train.jsonl", 70, "train"),
    "rmb": ("rmb-pairwise.jsonl", 120, "shift"),
    "pandalm": ("pandalm-test.jsonl", 100, "shift"),
    "anthropic-helpful": ("anthropic-helpful-subset.jsonl", 50, "shift"),
}
STEERLM_ROWS = 40  # the shortest rated rows of the SteerLM sample (rows are long: ~250 tokens at the shortest)


# ----------------------------------------------------------------------------------------------
# Data: the pool of real responses, embedded once (resumable caches)


def shortest_indices(pairs, n: int) -> list[int]:
    """Indices of the n pairs with the fewest characters, in file order."""
    size = [sum(len(m["content"]) for m in p.chosen + p.rejected) for p in pairs]
    return sorted(sorted(range(len(pairs)), key=lambda i: (size[i], i))[:n])


def write_pool_files(folder: Path) -> dict:
    """The derived JSONL files the caches are extracted from (pairs of each source; the SteerLM rows), and the
    UltraFeedback scores of its pairs' two sides by pair id."""
    from bench.gating_real import write_pairs_jsonl
    from pipeline.atomic import write_text
    from pipeline.data.preferences import load_preferences

    folder.mkdir(parents=True, exist_ok=True)
    files, uf_scores = {}, {}
    for name, (file, n, _) in SOURCES.items():
        pairs, _ = load_preferences(str(SHARED_DATA / file))
        keep = shortest_indices(pairs, n)
        if name == "ultrafeedback":  # the loader keeps every row of this file, in file order (checked)
            raw = [json.loads(line) for line in UF_TRAIN.read_text().splitlines() if line.strip()]
            if len(raw) != len(pairs):
                raise SystemExit(f"{UF_TRAIN}: {len(raw)} lines but {len(pairs)} pairs loaded")
            uf_scores = {pairs[i].pair_id: (raw[i]["metadata"]["score_chosen"], raw[i]["metadata"]["score_rejected"])
                         for i in keep}
        files[name] = folder / f"{name}-shortest-{n}.jsonl"
        if not files[name].is_file():
            write_pairs_jsonl([pairs[i] for i in keep], files[name])
    lines = [line for line in STEERLM.read_text().splitlines() if line.strip()]
    size = [len(line) for line in lines]
    keep = sorted(sorted(range(len(lines)), key=lambda i: (size[i], i))[:STEERLM_ROWS])
    files["steerlm"] = folder / f"steerlm-shortest-{STEERLM_ROWS}.jsonl"
    if not files["steerlm"].is_file():
        write_text(files["steerlm"], "".join(lines[i] + "\n" for i in keep))
    return {"files": files, "uf_scores": uf_scores}


def extract(cache: Path) -> tuple[dict, float]:
    """Embed the pool with the offline backbone (the default dtype; float32 storage), resumable."""
    from pipeline.configs import SMOLLM2_GGUF, DatasetSpec, ExtractConfig
    from pipeline.recipes.extract import run_extract

    t0 = time.perf_counter()
    pool = write_pool_files(cache / "data")
    datasets = {name: DatasetSpec(name, "preferences", str(pool["files"][name])) for name in SOURCES}
    datasets["steerlm"] = DatasetSpec("steerlm", "ratings", str(pool["files"]["steerlm"]))
    run_extract(ExtractConfig(backbone=SMOLLM2_GGUF, cache_dir=str(cache), datasets=datasets, device="cpu",
                              storage_dtype="float32", max_length=2048, part_rows=512, max_tokens_per_batch=4096))
    return pool, time.perf_counter() - t0


if __name__ == "__main__":
    import sys

    extract(Path(sys.argv[1]))
