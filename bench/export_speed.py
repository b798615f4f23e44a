"""Export and scoring speed on SmolLM2-135M-Instruct, side by side in one run.

Export, onto the converted SmolLM2 checkpoint (one 538 MB fp32 safetensors file), with seeded random
heads (d = 576, URM gate):
  ours_link         `urm export`: the backbone file hardlinked, heads as one more shard, merged index
  ours_copy         `urm export --no-link`: the backbone file copied instead
  load_and_save     the naive way: load the stitched model, then `save_pretrained` it
(best of --repeats wall times after a warm-up export, and the bytes each writes that are not hardlinks;
every `urm export` also pays fixed costs: hashing the 93 MB GGUF to find its converted copy, loading
the tokenizer twice, building the backbone on the meta device).
Scoring, over the same conversations (the 50 shortest real hh-rlhf pairs = 100 conversations):
  ours_batched      pipeline.serve.scoring.score_ids, what `urm score` runs: length-sorted token-budget batches
  one_at_a_time     the exported model called once per conversation (the usage snippet's loop)
  urm_score_e2e     pipeline.recipes.score.score_file end to end (model load, rendering, JSONL written)
Writes bench/results/export_speed.json, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench import HH_RLHF, machine_info, shortest_real_pairs, timed, write_result


def smollm2_heads(directory: Path) -> tuple[Path, dict]:
    """Seeded random heads for SmolLM2 whose heads.json claims a cache of that backbone."""
    from pipeline import ATTRIBUTES
    from pipeline.configs import SMOLLM2_GGUF
    from pipeline.features import chat_template_hash, open_backbone
    from pipeline.model import CacheIdentity, Heads, HeadsMeta, StageRecord, save_heads

    files = open_backbone(SMOLLM2_GGUF)
    torch.manual_seed(0)
    heads = Heads(files.hidden_size, len(ATTRIBUTES), gate="urm")
    identity = CacheIdentity("bench", "bench", SMOLLM2_GGUF, files.revision, chat_template_hash(files.tokenizer),
                             files.hidden_size)
    meta = HeadsMeta(list(ATTRIBUTES), heads.d, heads.architecture, StageRecord(config={}, cache=identity))
    save_heads(directory, heads, meta)
    return directory, {"backbone_dir": files.path,
                       "backbone_bytes": sum(p.stat().st_size for p in Path(files.path).iterdir())}


def bytes_written(out: Path, backbone_dir: Path) -> int:
    """Bytes of the export's files that are not hardlinks of the backbone's files."""
    backbone = {p.stat().st_ino for p in backbone_dir.iterdir()}
    return sum(p.stat().st_size for p in out.iterdir() if p.stat().st_ino not in backbone)


def run_exports(root: Path, heads: Path, backbone_dir: Path, repeats: int) -> dict:
    """Best of ``repeats`` wall times of each way (after one warm-up export), and the bytes each writes."""
    from pipeline.configs import ExportConfig
    from pipeline.model.modeling_urm import URMForSequenceClassification
    from pipeline.recipes.export import export_model
    from transformers import AutoConfig

    export_model(ExportConfig(heads_dir=str(heads), out_dir=str(root / "warm-up")))
    config = AutoConfig.from_pretrained(root / "warm-up")

    def ours(name: str, link: bool):
        cfg = ExportConfig(heads_dir=str(heads), out_dir=str(root / name), link=link, overwrite=True)
        return lambda: export_model(cfg)

    def load_and_save():
        URMForSequenceClassification.from_pretrained(root / "warm-up", config=config).save_pretrained(root / "saved")

    ways = {"ours_link": ours("ours_link", True), "ours_copy": ours("ours_copy", False), "load_and_save": load_and_save}
    times = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            times[name].append(timed(fn))
    out = {name: {"seconds": min(t), "all_seconds": t} for name, t in times.items()}
    for name, folder in (("ours_link", "ours_link"), ("ours_copy", "ours_copy"), ("load_and_save", "saved")):
        out[name]["bytes_written"] = bytes_written(root / folder, backbone_dir)
    out["speedup_link_vs_load_and_save"] = out["load_and_save"]["seconds"] / out["ours_link"]["seconds"]
    return out


@torch.inference_mode()
def one_at_a_time(model, ids: list[list[int]]) -> float:
    model(torch.tensor([ids[0]]))  # warm-up
    t = time.perf_counter()
    for x in ids:
        model(torch.tensor([x], device=model.device)).logits[0][0].item()
    return time.perf_counter() - t


def run_scoring(model_dir: Path, pairs, max_tokens: int, root: Path) -> dict:
    from pipeline.configs import ScoreConfig, build
    from pipeline.features import pad_id_of, render_ids
    from pipeline.recipes.score import score_file
    from pipeline.serve import load_scorer, score_ids

    model, tokenizer = load_scorer(str(model_dir), "float32", "cpu")
    conversations = [c for p in pairs for c in (p.chosen, p.rejected)]
    ids = render_ids(tokenizer, conversations)
    tokens = sum(len(x) for x in ids)
    counts = {"padded": 0}
    score_ids(model, ids[:2], max_tokens, pad_id_of(tokenizer))  # warm-up
    t = time.perf_counter()
    score_ids(model, ids, max_tokens, pad_id_of(tokenizer),
              on_batch=lambda n, real, padded: counts.update(padded=counts["padded"] + padded))
    batched = time.perf_counter() - t
    single = one_at_a_time(model, ids)
    source = root / "pairs.jsonl"
    source.write_text("".join(json.dumps({"id": p.pair_id, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                              for p in pairs))
    config = build(ScoreConfig, dict(input=str(source), output=str(root / "scores.jsonl"), device="cpu",
                                     dtype="float32", max_tokens_per_batch=max_tokens))
    holder = {}
    e2e_wall = timed(lambda: holder.update(r=score_file(str(model_dir), config)))

    def rate(seconds):
        return {"seconds": seconds, "rows_per_s": len(ids) / seconds, "tokens_per_s": tokens / seconds}

    return {"conversations": len(ids), "tokens": tokens,
            "lengths": f"{min(map(len, ids))}-{max(map(len, ids))}", "max_tokens_per_batch": max_tokens,
            "ours_batched": {**rate(batched), "padding_share": 1 - tokens / counts["padded"]},
            "one_at_a_time": rate(single),
            "urm_score_e2e": {**rate(e2e_wall), "scoring_only_tokens_per_s": holder["r"]["tokens_per_s"]},
            "speedup_batched_vs_one_at_a_time": single / batched}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench export_speed")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--max-tokens-per-batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="export timings: best of this many")
    args = ap.parse_args(argv)
    if not HH_RLHF.is_file():
        print(f"skipped: {HH_RLHF} not found (real data lives in ../shared/data)")
        return {}
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="urm-bench-export-"))
    try:
        heads, backbone = smollm2_heads(root / "heads")
        exports = run_exports(root, heads, Path(backbone["backbone_dir"]), args.repeats)
        scoring = run_scoring(root / "ours_link", shortest_real_pairs(args.pairs), args.max_tokens_per_batch, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"what": __doc__.split("\n")[0], "backbone": backbone, "export": exports,
              "scoring": {"rows": f"{args.pairs} shortest pairs of {HH_RLHF.name}", **scoring},
              "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
              "machine": machine_info()}
    path = write_result("export_speed", result)
    e, s = exports, scoring
    mb = {k: e[k]["bytes_written"] / 1e6 for k in ("ours_link", "ours_copy", "load_and_save")}
    print(f"export: ours (hardlink) {e['ours_link']['seconds']:.2f} s / {mb['ours_link']:.1f} MB written, ours (copy) "
          f"{e['ours_copy']['seconds']:.2f} s / {mb['ours_copy']:.0f} MB, load + save_pretrained "
          f"{e['load_and_save']['seconds']:.2f} s / {mb['load_and_save']:.0f} MB | score {s['conversations']} conversations: "
          f"batched {s['ours_batched']['rows_per_s']:.2f} rows/s {s['ours_batched']['tokens_per_s']:.0f} tok/s, "
          f"one at a time {s['one_at_a_time']['rows_per_s']:.2f} rows/s {s['one_at_a_time']['tokens_per_s']:.0f} tok/s "
          f"| load {load_before[0]:.2f} -> {result['load_average_after'][0]:.2f} -> {path}")
    return result


if __name__ == "__main__":
    main()
