"""`urm serve` and `vllm serve` with the plugin, on the same 200 real conversations, side by side in one run.

The export: runs/demo/model (SmolLM2-135M-Instruct and the demo's heads: `make demo`), or --model DIR. The
conversations: both sides of the --pairs (100) shortest pairs of ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
(real ones, `pipeline.data.testing.shortest_real_pairs`), rendered by the export's chat template as text. Both
servers are up at once on 127.0.0.1, float32 on the CPU:
  urm         `urm serve MODEL` (this venv), OpenRLHF's request: POST /get_reward {"query": [text]}
  vllm        `.venv-vllm/bin/vllm serve MODEL --runner pooling --trust-remote-code` (the plugin; README "Serving
              at scale" for the CPU options), verl's request: POST /classify {"model", "input": text, "activation":
              false}, reward = data[-1]["probs"][-1]
At each concurrency level (--concurrency: that many client threads, each with its own keep-alive connection, one
conversation per request) the 200 conversations go to each server once, split over --rounds rounds (round r: every
rounds-th conversation from the r-th) that alternate between the engines (the one that goes first alternates too),
so a busy spell of this shared machine falls on both alike. Compute threads are matched: vLLM's CPU worker runs
on one OpenMP thread bound to a core (it reserves the other core of a 2-core machine for its API server), so `urm
serve` gets OMP_NUM_THREADS=1 (--urm-threads; on a machine loaded by other jobs torch's default of one thread per
core made `urm serve` many times slower per request than one thread). Every answer is checked
against `urm score`'s reward for its conversation (computed here beforehand, float32): an error or a reward off
by more than 1e-4 is counted, never skipped. Reported per engine and level: requests/s, p50 / p99 latency.

Then verl's own preprocessing on this export (its reward loop strips a leading BOS string from the templated text:
right for Llama 3, whose tokenizer adds it back; SmolLM2's BOS is <|im_start|>, which its tokenizer does not add),
and the served-vs-scored differences over the 200: the float32 servers' (from the load's own answers), and the
bf16 gap: vLLM with the backbone in bfloat16 (offline ``LLM.embed``: score, score_std and the reward, heads in
float32) and `urm score --dtype bfloat16`, each against `urm score` in float32. Writes
bench/results/serve_engines.json. The machine is shared (the load average is recorded): compare ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench import machine_info, run_clients, write_result
from bench.serve_load import serve

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / ".venv-vllm"
SHARED = ROOT.parent / "shared" / "data"
SOURCE = "hh-rlhf-harmless-base-test.jsonl.gz"
# What vLLM needs on a CPU (README "Serving at scale"): a small share of host memory for its KV cache (the flag
# is named for GPUs), no graph compilation (inductor on 2 cores costs minutes at start for nothing here).
CPU_OPTIONS = ("--gpu-memory-utilization", "0.1", "--enforce-eager")


# ----------------------------------------------------------------------------------------------
# `vllm serve` in a subprocess (also what tests/test_vllm_serve.py starts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def vllm_serve_args(vllm: str | Path, model: Path, port: int, dtype: str = "float32", max_model_len: int = 2048,
                    options: tuple = ()) -> list[str]:
    """`vllm serve` as the README gives it for a CPU, on loopback."""
    return [str(vllm), "serve", str(model), "--runner", "pooling", "--trust-remote-code", "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(port), *CPU_OPTIONS, "--max-model-len", str(max_model_len), *options]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's whole group (vLLM's engine and worker processes), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def vllm_server(args: list[str], log_path: Path, timeout: float = 600.0):
    """``args`` (a `vllm serve` command line naming --port) in its own process group; yields the base URL once
    /health answers; the whole group stopped on the way out, whatever happened."""
    port = args[args.index("--port") + 1]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not come up (exit {proc.poll()}): "
                                   f"{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        stop(proc)


# ----------------------------------------------------------------------------------------------
# The workload and the load


def workload(model: Path, pairs: int) -> tuple[list[str], dict, list[int]]:
    """The conversations as templated text, `urm score`'s outputs for them (float32) and their token counts."""
    from pipeline.data.testing import shortest_real_pairs
    from pipeline.features import encode_texts, pad_id_of, render_texts
    from pipeline.serve import load_scorer, score_ids

    chosen = shortest_real_pairs(pairs, SHARED / SOURCE)
    conversations = [c for p in chosen for c in (p.chosen, p.rejected)]
    scorer, tokenizer = load_scorer(str(model), "float32", "cpu")
    texts = render_texts(tokenizer, conversations)
    ids = encode_texts(tokenizer, texts)
    out = score_ids(scorer, ids, 8192, pad_id_of(tokenizer))
    return texts, {k: v for k, v in out.items()}, [len(x) for x in ids]


ENGINES = {  # name -> (path, body of one request, the reward in its answer)
    "urm": ("/get_reward", lambda model, text: {"query": [text]}, lambda answer: answer["rewards"][0]),
    "vllm": ("/classify", lambda model, text: {"model": model, "input": text, "activation": False},
             lambda answer: answer["data"][-1]["probs"][-1]),
}


def run_load(engine: str, url: str, model: str, texts: list[str], expected: list[float], clients: int,
             tolerance: float = 1e-4) -> dict:
    """Every conversation once, from ``clients`` threads; each answer checked against ``expected``."""
    path, body, read = ENGINES[engine]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies, differences, failures = [], [], {"errors": 0, "mismatched": 0}
    lock = threading.Lock()
    turns = iter(range(len(texts)))

    def client():
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        while True:
            with lock:
                i = next(turns, None)
            if i is None:
                break
            started = time.perf_counter()
            try:
                conn.request("POST", path, body=json.dumps(body(model, texts[i])),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = json.loads(response.read())
                ok = response.status == 200
            except (OSError, ValueError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=300)
                ok = False
            took = time.perf_counter() - started
            with lock:
                if not ok:
                    failures["errors"] += 1
                    continue
                difference = abs(read(answer) - expected[i])
                differences.append(difference)
                if difference > tolerance:
                    failures["mismatched"] += 1
                latencies.append(took)
        conn.close()

    seconds = run_clients(client, clients)
    return {"seconds": seconds, "requests": len(texts), **failures, "latencies_ms": [1000 * x for x in latencies],
            "max_abs_difference": max(differences) if differences else None}


def summarise(rounds: list[dict]) -> dict:
    """One engine at one level: rounds merged (latency percentiles over every answer)."""
    ms = np.concatenate([r["latencies_ms"] for r in rounds]) if any(r["latencies_ms"] for r in rounds) else [np.nan]
    seconds, requests = sum(r["seconds"] for r in rounds), sum(r["requests"] for r in rounds)
    return {"requests": requests, "rounds": len(rounds), "errors": sum(r["errors"] for r in rounds),
            "mismatched": sum(r["mismatched"] for r in rounds), "requests_per_s": requests / seconds,
            "requests_per_s_by_round": [round(r["requests"] / r["seconds"], 2) for r in rounds],
            "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))},
            "max_abs_difference_from_urm_score": max((r["max_abs_difference"] or 0.0) for r in rounds)}


def verl_preprocessing_gap(url: str, model: str, texts: list[str], expected: list[float]) -> dict:
    """verl strips a leading BOS string from the templated text before it posts it (its tokenizer is expected to
    add the BOS back: Llama 3's does). Where the tokenizer adds none (SmolLM2, whose BOS is <|im_start|>), the
    first token is lost: how far the reward then moves, over the conversations."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)  # the export's own config class
    bos = tokenizer.bos_token
    stripped = [t[len(bos):] if bos and t.startswith(bos) else t for t in texts]
    changed = sum(a != b for a, b in zip(stripped, texts))
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    d = []
    for text, want in zip(stripped, expected):
        conn.request("POST", "/classify", body=json.dumps({"model": model, "input": text, "activation": False}),
                     headers={"Content-Type": "application/json"})
        d.append(abs(json.loads(conn.getresponse().read())["data"][-1]["probs"][-1] - want))
    conn.close()
    return {"bos_token": bos, "conversations_changed": changed, "max_abs": float(max(d)),
            "median_abs": float(np.median(d))}


# ----------------------------------------------------------------------------------------------
# The bf16 gap


OFFLINE = r'''
import json, sys

def main():
    spec = json.loads(open(sys.argv[1]).read())
    from vllm import LLM
    from vllm.config import PoolerConfig

    llm = LLM(model=spec["model"], runner="pooling", trust_remote_code=True, dtype=spec["dtype"],
              gpu_memory_utilization=0.1, enforce_eager=True, max_model_len=spec["max_model_len"],
              pooler_config=PoolerConfig(task="embed"), hf_overrides=spec["hf_overrides"])
    out = llm.embed([{"prompt_token_ids": ids} for ids in spec["ids"]], use_tqdm=False)
    print("RESULT " + json.dumps([o.outputs.embedding for o in out]), flush=True)

if __name__ == "__main__":
    main()
'''


def vllm_answers(python: Path, model: Path, ids: list[list[int]], dtype: str, tmp: Path, hf_overrides=None) -> list:
    """The whole answer per conversation from ``LLM.embed`` in .venv-vllm (a child process)."""
    script, spec = tmp / "offline.py", tmp / f"spec-{dtype}.json"
    script.write_text(OFFLINE)
    spec.write_text(json.dumps({"model": str(model), "ids": ids, "dtype": dtype, "max_model_len": 2048,
                                "hf_overrides": hf_overrides or {}}))
    done = subprocess.run([str(python), str(script), str(spec)], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM offline run failed: {done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def gaps(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """max and median |got - reference| per field."""
    out = {}
    for name in got:
        d = np.abs(np.asarray(got[name], dtype=np.float64) - np.asarray(reference[name], dtype=np.float64))
        out[name] = {"max_abs": float(d.max()), "median_abs": float(np.median(d))}
    return out


def dtype_gaps(model: Path, texts: list[str], out32: dict, tmp: Path) -> dict:
    """vLLM float32 and bfloat16 (heads float32 in both), and `urm score` bfloat16, against `urm score` float32."""
    from pipeline.features import encode_texts, pad_id_of
    from pipeline.model import rewards_of
    from pipeline.serve import load_scorer, read_answer, score_ids

    scorer, tokenizer = load_scorer(str(model), "bfloat16", "cpu")
    ids = encode_texts(tokenizer, texts)
    out16 = score_ids(scorer, ids, 8192, pad_id_of(tokenizer))
    settings = scorer.config.urm
    reference = {"score": out32["score"], "score_std": out32["score_std"],
                 "lcb_reward": rewards_of(out32, "lcb", 1.0)}
    result = {"urm_score_bfloat16": gaps({"score": out16["score"], "score_std": out16["score_std"],
                                          "lcb_reward": rewards_of(out16, "lcb", 1.0)}, reference)}
    python = VLLM_VENV / "bin" / "python"
    for dtype in ("float32", "bfloat16"):
        rows = [read_answer(v, settings["attributes"], settings["members"], settings["base_score"])
                for v in vllm_answers(python, model, ids, dtype, tmp, {"urm_reward": "lcb", "urm_risk": 1.0})]
        result[f"vllm_{dtype}"] = gaps({"score": [r["score"] for r in rows], "score_std": [r["score_std"] for r in rows],
                                        "lcb_reward": [r["reward"] for r in rows]}, reference)
    return result


# ----------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench serve_engines")
    p.add_argument("--model", default=str(ROOT / "runs" / "demo" / "model"), help="the export to serve (`make demo`)")
    p.add_argument("--pairs", type=int, default=100, help="the shortest real pairs: twice as many conversations")
    p.add_argument("--concurrency", default="1,4,16", help="client threads, one level after another")
    p.add_argument("--rounds", type=int, default=2, help="rounds per engine and level (each a share of the "
                   "conversations), interleaved between the engines")
    p.add_argument("--no-dtype-gap", action="store_true", help="skip the bf16 gap (two offline vLLM runs)")
    p.add_argument("--urm-threads", type=int, default=1, help="torch's compute threads for `urm serve` (its "
                   "OMP_NUM_THREADS) and this process's own scoring; 1 by default, as vLLM's CPU worker computes on "
                   "one thread bound to a core (it reserves the other core of this machine for its API server)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.urm_threads)
    model, vllm = Path(args.model), VLLM_VENV / "bin" / "vllm"
    for needed, how in ((model / "config.json", "`make demo` makes runs/demo/model"),
                        (vllm, "`make test-vllm` builds .venv-vllm"), (SHARED / SOURCE, "../shared/data is the "
                                                                        "real data beside the repo")):
        if not needed.exists():
            raise SystemExit(f"serve_engines needs {needed}: {how}")
    load_before = os.getloadavg()
    texts, out32, lengths = workload(model, args.pairs)
    expected = out32["score"].tolist()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict = {name: {} for name in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        with serve(model, "--device", "cpu", "--dtype", "float32",
                   env={"OMP_NUM_THREADS": str(args.urm_threads)}) as (_, urm_url), \
                vllm_server(vllm_serve_args(vllm, model, free_port()), tmp / "vllm.log") as vllm_url:
            print(f"both servers up in {time.perf_counter() - started:.0f} s", flush=True)
            urls = {"urm": urm_url, "vllm": vllm_url}
            for name, url in urls.items():  # warm-up, and the first check of every answer
                run_load(name, url, str(model), texts[:16], expected[:16], 4)
            for clients in levels:
                rounds: dict[str, list] = {name: [] for name in ENGINES}
                for r in range(args.rounds):  # round r: every rounds-th conversation from the r-th, to both engines
                    part, want = texts[r::args.rounds], expected[r::args.rounds]
                    for name in (list(urls) if r % 2 == 0 else list(urls)[::-1]):
                        rounds[name].append(run_load(name, urls[name], str(model), part, want, clients))
                for name in ENGINES:
                    s = results[name][str(clients)] = summarise(rounds[name])
                    print(f"{name} x{clients}: {s['requests_per_s']:.1f} req/s (rounds {s['requests_per_s_by_round']}), "
                          f"p50 {s['latency_ms']['p50']:.0f} ms, p99 {s['latency_ms']['p99']:.0f} ms, errors "
                          f"{s['errors']}, mismatched {s['mismatched']}, max |diff| "
                          f"{s['max_abs_difference_from_urm_score']:.2e}", flush=True)
            verl = verl_preprocessing_gap(vllm_url, str(model), texts, expected)
            print(f"verl's preprocessing (leading BOS string stripped): {json.dumps(verl)}", flush=True)
        ratios = {str(c): results["vllm"][str(c)]["requests_per_s"] / results["urm"][str(c)]["requests_per_s"]
                  for c in levels}
        print("vllm / urm requests/s: " + ", ".join(f"x{c}: {r:.2f}" for c, r in ratios.items()), flush=True)
        dtype = None if args.no_dtype_gap else dtype_gaps(model, texts, out32, tmp)
        if dtype:
            print("served vs scored (urm score float32): " + json.dumps(dtype), flush=True)
    shown = model.resolve().relative_to(ROOT) if model.resolve().is_relative_to(ROOT) else model
    write_result("serve_engines", {
        "what": f"urm serve (POST /get_reward, OpenRLHF) and vllm serve with the urm plugin (POST /classify, verl's "
                f"request) on loopback, both up at once, float32 on CPU, urm serve on {args.urm_threads} compute "
                f"thread(s), vLLM's worker on its one bound thread; the export {shown}; {len(texts)} real "
                f"conversations (both sides of the {args.pairs} shortest pairs of {SOURCE}); each level's rounds "
                "interleaved; every answer checked against `urm score` (1e-4)",
        "vllm_options": list(CPU_OPTIONS), "config": {**vars(args), "model": str(shown)},
        "conversation_tokens": {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths),
                                "total": int(sum(lengths))},
        "engines": results, "vllm_over_urm_requests_per_s": ratios,
        "served_vs_scored": dtype, "verl_bos_stripped": verl, "versions": versions(),
        "machine": {**machine_info(), "load_average_before": list(load_before)},
    })


def versions() -> dict:
    done = subprocess.run([str(VLLM_VENV / "bin" / "python"), "-c", "import vllm, torch, transformers; "
                           "print(vllm.__version__, torch.__version__, transformers.__version__)"],
                          capture_output=True, text=True, timeout=300)
    names = ("vllm", "torch", "transformers")
    return dict(zip(names, done.stdout.split())) if done.returncode == 0 else {}
