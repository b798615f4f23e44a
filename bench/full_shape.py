"""Every step at the published backbone's width, within memory: a random Llama with Llama-3.1-8B's layer shapes.

The backbone: hidden 4096, intermediate 14336, 32 attention heads / 8 KV heads, rope llama3 (theta 500000,
factor 8), ``--layers`` of them (4 by default; 32 is the real 8B, 16 GB in bf16), saved as a Skywork-style
``LlamaForSequenceClassification`` (one label: a reward model, so extraction stores its own score too) in
bf16, sharded at 1 GB, with SmolLM2's tokenizer (vocabulary 49152). Its weights are random (seeded): the
numbers it gives say nothing about rewards, only about time and memory.

The steps, each `urm` as a user types it, in a child process of its own (``bench.measured``: wall and CPU
seconds, peak RSS), on a few short real rows of ../shared/data (``--ratings`` shortest SteerLM rows,
``--pairs`` shortest UltraFeedback pairs; up to 256 tokens, a token budget of 1024 a forward pass):
  extract ratings / extract pairs   `urm extract --dtype auto-bf16` (bf16 on a CPU with native bf16)
  train-heads                       the defaults (ridge, 8 bootstrap members, --gate auto)
  export                            onto the backbone (its shards hardlinked)
  score                             `urm score` of the rated conversations (--dtype auto)
  serve                             `urm serve` (--dtype auto), the same conversations over HTTP, then stopped
Each step's peak RSS is divided by the backbone's bytes (its safetensors files, in the dtype they are stored
in: the compute dtype of every step here when the CPU runs bf16 natively): the ``*_ratio`` keys; beside them
the peak of a process that only imports torch, transformers and the package (``imports_only``: the part of
every peak that does not grow with the backbone, a larger share of 4 layers than of 32). With
``--reference DIR`` (an earlier checkout with its own .venv) every step runs under it too, on its own caches
and export: the table before and after. Writes bench/results/full_shape.json (keeps the backbone in
``--work-dir``, so a rerun does not build it again).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench import SHARED_DATA, machine_info, write_result
from bench.measured import checkout_commit, checkout_python, run_measured

ROOT = Path(__file__).resolve().parents[1]
STEERLM = SHARED_DATA / "steerlm-attributes-sample512.jsonl"
UF_TRAIN = SHARED_DATA / "ultrafeedback-binarized-sample-train.jsonl"
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                   hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
SHARD_BYTES = 1 << 30
MAX_TOKENS = 256  # the rows' longest rendering
TOKEN_BUDGET = 1024  # every step's --max-tokens-per-batch: activations bounded the same way for each


def build_backbone(out: Path, layers: int, seed: int = 0) -> Path:
    """A random Skywork-style reward model with Llama-3.1-8B's layer shapes in ``out`` (bf16 safetensors shards,
    an index, config.json, SmolLM2's tokenizer), written one tensor at a time: the builder holds at most one
    shard. Kept when already there for these layers."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from pipeline.atomic import atomic_directory
    from pipeline.configs import SMOLLM2_GGUF
    from pipeline.features.backbone import resolve_backbone

    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers:
        return out
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(SMOLLM2_GGUF)[0])
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, num_labels=1,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **LLAMA_31_8B)
    config.architectures = ["LlamaForSequenceClassification"]
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {name: (p.shape, name.endswith("norm.weight"))
                  for name, p in LlamaForSequenceClassification(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, (shape, is_norm) in shapes.items():
        t = torch.ones(shape, dtype=torch.bfloat16) if is_norm else \
            (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if current and size + t.numel() * 2 > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 2
    shards.append(current)
    with atomic_directory(out) as tmp:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            total += sum(t.numel() * 2 for t in shard.values())
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=2))
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def backbone_bytes(directory: Path) -> int:
    """The bytes of a checkpoint's weights: its safetensors files."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def short_rows(work: Path, ratings: int, pairs: int) -> tuple[Path, Path]:
    """The ``ratings`` shortest SteerLM rows and ``pairs`` shortest UltraFeedback pairs, as files (kept)."""
    from pipeline.atomic import write_text
    from pipeline.data.testing import shortest_real_pairs

    rows = sorted(STEERLM.read_text().splitlines(), key=len)[:ratings]
    ratings_file, pairs_file = work / f"steerlm-shortest{ratings}.jsonl", work / f"uf-shortest{pairs}.jsonl"
    write_text(ratings_file, "".join(line + "\n" for line in rows))
    write_text(pairs_file, "".join(json.dumps({"id": p.pair_id, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                                   for p in shortest_real_pairs(pairs, UF_TRAIN)))
    return ratings_file, pairs_file


def conversations_file(ratings_file: Path, backbone: Path, out: Path) -> Path:
    """The rated rows' conversations that fit ``MAX_TOKENS`` (as extraction kept them; `urm serve` refuses a longer
    one) as `urm score` input, a ``messages`` row a line."""
    from transformers import AutoTokenizer

    from pipeline.atomic import write_text
    from pipeline.data.ratings import load_ratings
    from pipeline.features import render_ids

    records, _ = load_ratings(str(ratings_file))
    ids = render_ids(AutoTokenizer.from_pretrained(backbone), [r.messages for r in records])
    kept = [r for r, x in zip(records, ids) if len(x) <= MAX_TOKENS]
    write_text(out, "".join(json.dumps({"id": f"row{i}", "messages": r.messages}) + "\n" for i, r in enumerate(kept)))
    return out


def serve_measured(urm: Path, model: Path, conversations: Path, cwd: Path, env: dict, log: Path, options: list[str],
                   timeout: float = 1800) -> dict:
    """`urm serve MODEL --port 0 --device cpu` in a child process: wait for its address, POST every conversation
    to /score (one request), stop it with SIGINT; its wall and CPU seconds and peak RSS (``os.wait4``)."""
    from bench.serve_load import request

    messages = [json.loads(line)["messages"] for line in conversations.read_text().splitlines()]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([str(urm), "serve", str(model), "--port", "0", "--device", "cpu", *options], cwd=cwd,
                                env=env, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
        found: list[str] = []

        def read():
            for line in proc.stdout:
                if "listening on http://" in line and not found:
                    found.append(line.split("listening on ", 1)[1].split()[0])

        threading.Thread(target=read, daemon=True).start()
        status, answer = 0, None
        while time.perf_counter() - t0 < timeout:
            if found:
                status, answer = request(found[0], "POST", "/score", {"conversations": messages}, timeout=timeout)
                break
            pid, st, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                raise SystemExit(f"urm serve ended before it listened:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, st, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(st)
    if status != 200:
        raise SystemExit(f"urm serve answered {status}: {answer}\n{log.read_text()[-3000:]}")
    return {"returncode": proc.returncode, "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "scored": len(answer.get("scores") or answer.get("results") or [])}


def run_steps(checkout: str | None, backbone: Path, work: Path, ratings_file: Path, pairs_file: Path,
              conversations: Path, total: int) -> dict:
    """Every step under ``checkout`` (this one when None), its artifacts in ``work``: name -> measurement."""
    urm = checkout_python(checkout).parent / "urm"
    cwd = Path(checkout) if checkout else ROOT
    env = {k: v for k, v in os.environ.items() if not k.startswith("URM_")}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    cache, heads, model = work / "cache", work / "heads", work / "model"
    budget = ["--max-tokens-per-batch", str(TOKEN_BUDGET)]
    common = ["--backbone", str(backbone), "--cache-dir", str(cache), "--dtype", "auto-bf16", "--device", "cpu",
              "--max-length", str(MAX_TOKENS), *budget]
    steps = {
        "extract_ratings": [urm, "extract", *common, "--source", ratings_file, "--kind", "ratings", "--name", "ratings"],
        "extract_pairs": [urm, "extract", *common, "--source", pairs_file, "--kind", "preferences", "--name",
                          "preferences"],
        "train_heads": [urm, "train-heads", "--cache-dir", cache, "--heads-dir", heads, "--device", "cpu"],
        "export": [urm, "export", "--backbone", backbone, "--heads-dir", heads, "--out-dir", model, "--overwrite"],
        "score": [urm, "score", model, "-i", conversations, "-o", work / "scores.jsonl", "--device", "cpu", *budget],
    }
    imports = run_measured([str(checkout_python(checkout)), "-c", "import torch, transformers, pipeline.serve, "
                            "pipeline.model.modeling_urm, pipeline.features"], cwd=cwd, env=env)
    out = {"imports_only": step_record(imports, total)}  # the fixed part of every step's peak: Python, torch, ...
    for name, cmd in steps.items():
        run = run_measured([str(c) for c in cmd], cwd=cwd, env=env, log_path=work / f"{name}.log")
        if run["returncode"] != 0:
            raise SystemExit(f"{name} failed under {cwd}:\n{run['output_tail']}")
        out[name] = step_record(run, total)
        print(f"  {name}: {run['wall_seconds']:.1f} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB "
              f"({out[name]['peak_rss_ratio']:.2f}x the backbone)", flush=True)
    run = serve_measured(urm, model, conversations, cwd, env, work / "serve.log", budget)
    out["serve"] = step_record(run, total)
    print(f"  serve: {run['wall_seconds']:.1f} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({out['serve']['peak_rss_ratio']:.2f}x the backbone)", flush=True)
    return out


def steps_of(run: dict) -> list[dict]:
    """The measured steps of a run (not the imports-only baseline)."""
    return [v for k, v in run.items() if k != "imports_only"]


def step_record(run: dict, total: int) -> dict:
    return {"wall_seconds": run["wall_seconds"], "cpu_seconds": run["cpu_seconds"],
            "peak_rss_bytes": run["peak_rss_bytes"], "peak_rss_ratio": run["peak_rss_bytes"] / total}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench full_shape")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (32 = the real Llama-3.1-8B)")
    ap.add_argument("--ratings", type=int, default=24, help="shortest SteerLM rows")
    ap.add_argument("--pairs", type=int, default=16, help="shortest UltraFeedback pairs")
    ap.add_argument("--reference", default=None, help="an earlier checkout (with its .venv) to run beside this one")
    ap.add_argument("--work-dir", default=str(ROOT / "cache" / "bench-full-shape"))
    args = ap.parse_args(argv or [])
    if not (STEERLM.is_file() and UF_TRAIN.is_file()):
        print(f"skipped: the real data in {SHARED_DATA} is not there")
        return {}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    backbone = build_backbone(work / f"backbone-{args.layers}-layers", args.layers)
    build_seconds = time.perf_counter() - t0
    total = backbone_bytes(backbone)
    ratings_file, pairs_file = short_rows(work, args.ratings, args.pairs)
    conversations = conversations_file(ratings_file, backbone, work / "conversations.jsonl")
    runs = {}
    for name, checkout in (("after", None), ("before", args.reference)):
        if name == "before" and checkout is None:
            continue
        print(f"{name} ({checkout or ROOT}):", flush=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            runs[name] = {"checkout": str(checkout or ROOT), "commit": checkout_commit(checkout),
                          "steps": run_steps(checkout, backbone, Path(tmp), ratings_file, pairs_file, conversations,
                                             total)}
    after = runs["after"]["steps"]
    result = {"what": __doc__.split("\n")[0], "layers": args.layers, "backbone_bytes": total,
              "backbone_files": sorted(p.name for p in backbone.glob("*.safetensors")),
              "build_seconds": build_seconds, "rows": {"ratings": args.ratings, "pairs": args.pairs},
              "runs": runs, "max_peak_rss_ratio": max(s["peak_rss_ratio"] for s in steps_of(after)),
              "every_ratio_at_most_1.5": all(s["peak_rss_ratio"] <= 1.5 for s in steps_of(after)),
              "load_average_before": load_before, "machine": machine_info()}
    path = write_result("full_shape", result)
    print(f"backbone {total / 1e9:.2f} GB ({args.layers} layers); largest peak RSS / backbone bytes "
          f"{result['max_peak_rss_ratio']:.2f}x\n-> {path}")
    return result


if __name__ == "__main__":
    main()
