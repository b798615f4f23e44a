"""`urm train-heads --gate auto` (the default) on real pairs and on the demo, before and after: wall and CPU time, gate chosen.

Features of SmolLM2-135M-Instruct (d = 576; bf16 where the CPU runs it natively, as `--dtype auto-bf16`):
  real   ratings: the SteerLM sample of ../shared/data (rows up to 1024 tokens); pairs: the N (2000) shortest
         hh-rlhf harmless-base test pairs.
  demo   the demo preset's own caches (synthetic rows: 400 ratings, 160 pairs).
Each training is `urm train-heads` as a user types it (the default preset's options, `--device cpu`), run as a
child process and measured (``bench.measured``); with ``--reference DIR`` the same command runs under that
checkout too (e.g. `git worktree add --detach ../ref COMMIT && make -C ../ref install`), on the same caches,
one after the other. Reported per run: wall and CPU seconds, the seconds heads.json records for the value head
and for the gate's choice, and the gate chosen; and the ratios before / after. Caches are kept (a rerun skips
the extraction). Writes bench/results/gate_auto_real.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench import HH_RLHF, SHARED_DATA, machine_info, shortest_real_pairs, write_result
from bench.measured import checkout_commit, checkout_python, run_measured

ROOT = Path(__file__).resolve().parents[1]
STEERLM = SHARED_DATA / "steerlm-attributes-sample512.jsonl"


def extract_caches(cache: Path, pairs: int) -> dict:
    """The real caches (ratings, preferences) and the demo's, in ``cache``/real and ``cache``/demo."""
    from bench.gating_real import write_pairs_jsonl
    from pipeline.configs import SMOLLM2_GGUF, DatasetSpec, ExtractConfig, load_config
    from pipeline.recipes.extract import run_extract

    pairs_file = cache / "data" / f"hh-rlhf-harmless-shortest-{pairs}.jsonl"
    if not pairs_file.is_file():
        write_pairs_jsonl(shortest_real_pairs(pairs), pairs_file)
    t0 = time.perf_counter()
    stats = run_extract(ExtractConfig(
        backbone=SMOLLM2_GGUF, cache_dir=str(cache / "real"), dtype="auto-bf16", device="cpu", max_length=1024,
        max_tokens_per_batch=4096, part_rows=512, storage_dtype="float32",
        datasets={"ratings": DatasetSpec("ratings", "ratings", str(STEERLM)),
                  "preferences": DatasetSpec("preferences", "preferences", str(pairs_file))}))
    demo = load_config("extract", "demo", {"cache_dir": str(cache / "demo")})
    demo.datasets = {k: v for k, v in demo.datasets.items() if k in ("ratings", "preferences")}
    stats.update({f"demo_{k}": v for k, v in run_extract(demo).items()})
    return {"seconds": time.perf_counter() - t0,
            "datasets": {name: {"rows": s.rows, "dropped": s.dropped, "tokens": s.tokens} for name, s in stats.items()}}


def train(checkout: str | None, cache: Path, heads: Path, seed: int) -> dict:
    """`urm train-heads` (defaults, --gate auto) under ``checkout`` (this one when None), measured."""
    urm = checkout_python(checkout).parent / "urm"
    cmd = [str(urm), "train-heads", "--cache-dir", str(cache), "--heads-dir", str(heads),
           "--device", "cpu", "--seed", str(seed)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("URM_")}
    run = run_measured(cmd, cwd=checkout or ROOT, env=env)
    if run["returncode"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run['output_tail']}")
    meta = json.loads((heads / "heads.json").read_text())
    gating = meta["gating"]["selection"]
    return {"checkout": str(checkout or ROOT), "commit": checkout_commit(checkout), "wall_seconds": run["wall_seconds"],
            "cpu_seconds": run["cpu_seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
            "value_head_seconds": meta["value_head"]["selection"].get("seconds"),
            "gate_choice_seconds": gating.get("seconds"), "gate_chosen": gating.get("chosen"),
            "gate_choice": {k: gating.get(k) for k in ("protocol", "reasons", "rule", "screen") if k in gating},
            "val_accuracy": meta["gating"]["val"]["accuracy"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench gate_auto_real")
    ap.add_argument("--pairs", type=int, default=2000, help="shortest real hh-rlhf pairs")
    ap.add_argument("--reference", default=None, help="an earlier checkout (with its .venv) to run beside this one")
    ap.add_argument("--cache-dir", default=str(ROOT / "cache" / "bench-gate-auto"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("real", "demo"), default=None, help="run one of the two data sets")
    args = ap.parse_args(argv or [])
    if not (HH_RLHF.is_file() and STEERLM.is_file()):
        print(f"skipped: the real data in {SHARED_DATA} is not there")
        return {}
    cache = Path(args.cache_dir)
    load_before = list(os.getloadavg())
    extracted = extract_caches(cache, args.pairs)
    runs: dict = {}
    for data in [d for d in ("real", "demo") if args.only in (None, d)]:
        runs[data] = {}
        for name, checkout in (("after", None), ("before", args.reference)):
            if name == "before" and checkout is None:
                continue
            heads = cache / "heads" / f"{data}-{name}"
            runs[data][name] = train(checkout, cache / data, heads, args.seed)
            print(f"{data} {name}: {runs[data][name]['wall_seconds']:.1f} s wall, "
                  f"{runs[data][name]['cpu_seconds']:.1f} s CPU, gate {runs[data][name]['gate_chosen']}", flush=True)
        if "before" in runs[data]:
            b, a = runs[data]["before"], runs[data]["after"]
            runs[data]["speedup"] = {k: b[k] / a[k] for k in ("wall_seconds", "cpu_seconds", "gate_choice_seconds")
                                     if a.get(k) and b.get(k)}
            runs[data]["same_gate"] = a["gate_chosen"] == b["gate_chosen"]
    result = {"what": __doc__.split("\n")[0], "extracted": extracted, "runs": runs, "load_average_before": load_before,
              "machine": machine_info()}
    path = write_result("gate_auto_real", result)
    print(json.dumps({d: {k: v for k, v in r.items() if k in ("speedup", "same_gate")} for d, r in runs.items()},
                     indent=1))
    print(f"load {load_before} -> {result['machine']['load_average']}\n-> {path}")
    return result


if __name__ == "__main__":
    main()
