"""`urm serve` under load on loopback: dynamic batching vs one request at a time, side by side in one run.

A tiny random Llama export (tests/tiny_models.py: hidden size 64, 2 layers; a reward-model backbone, a
2-member ensemble and the URM gate) is served by two `urm serve` subprocesses on 127.0.0.1, both up:
  dynamic          requests that arrive within --max-wait-ms (5 ms) of each other share a model call
  one_at_a_time    --no-dynamic-batching: each request its own model call
In --rounds rounds, alternating between the two servers, --clients threads (each with its own keep-alive
connection) send --requests / --rounds requests between them, OpenRLHF's way: POST /get_reward with one
templated query each. Two workloads: ``short`` (one-line questions and answers, ~30 tokens) and
``synthetic`` (the demo's synthetic HelpSteer2-schema conversations, 138-904 tokens). The load stops by
itself when the requests are sent. Every answer is checked against the export's own score for that
query (computed in this process with `urm score`'s path beforehand): a lost request, an error or
another request's score is counted, never skipped. Reported per mode: requests/s, p50 / p99 / max
latency, the server's model calls and the most requests one call took. Writes
bench/results/serve_load.json. Clients and servers share this machine's cores (and other jobs may run
on it: the load average is recorded), so the rounds are interleaved and the comparison is the ratio.
On a tiny model a forward pass is cheap and batching can only save per-call overhead; with a real
backbone on a GPU a call costs far more and batching is worth more.

``--rewards`` compares reward transforms instead, on the dynamic-batching server: ``mean`` (the
default), ``lcb``, ``uwo`` and ``mean`` behind --api-key, each answer checked against the transform
of the export's own outputs (pipeline.model.rewards); with ``--baseline DIR`` (a checkout of the code
before the transforms existed, e.g. ``git archive <commit> | tar -x -C DIR``) a server run from that
tree joins as ``today``, and every mode's throughput and latency are given as ratios to it. Writes
bench/results/serve_load_rewards.json.

`run_load` and `serve` are also what tests/test_serve.py runs (a short bounded load, no timing asserted).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench import machine_info, run_clients, write_result

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# A server in a subprocess, and a client


@contextmanager
def serve(model_dir, *options: str, timeout: float = 120.0, log_path: Path | None = None, headers: dict | None = None,
          env: dict | None = None, tree: Path = ROOT):
    """`urm serve MODEL_DIR --port 0 OPTIONS` in a subprocess (the code of ``tree``: this checkout unless told):
    yields (process, base URL) once it answers /health (sent with ``headers``); stopped (SIGTERM, then SIGKILL)
    on the way out whatever happened."""
    log = open(log_path, "w") if log_path else tempfile.TemporaryFile("w+")
    cmd = [sys.executable, "-m", "cli", "serve", str(model_dir), "--port", "0", *options]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                            env=env)
    try:
        url = wait_for_address(proc, timeout)
        deadline = time.monotonic() + timeout
        while request(url, "GET", "/health", timeout=5, headers=headers)[0] != 200:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"urm serve did not answer /health: {tail(log)}")
            time.sleep(0.1)
        yield proc, url
    except BaseException:
        if proc.poll() is not None:
            print(tail(log), file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        proc.stdout.close()
        log.close()


def tail(log) -> str:
    try:
        log.flush()
        log.seek(0)
        return log.read()[-3000:]
    except (OSError, ValueError):
        return "<no log>"


def wait_for_address(proc, timeout: float) -> str:
    """The base URL from the server's 'listening on http://HOST:PORT' line (read in a thread: never blocks)."""
    found: list[str] = []

    def read():
        for line in proc.stdout:
            if "listening on http://" in line:
                found.append(line.split("listening on ", 1)[1].split()[0])
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        raise RuntimeError(f"urm serve printed no address within {timeout:.0f} s (exit code {proc.poll()})")
    return found[0]


def request(url: str, method: str, path: str, payload=None, body: bytes | None = None, timeout: float = 60,
            headers: dict | None = None, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict | None]:
    """(status, JSON answer or None) of one request; (0, None) when the server cannot be reached."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    own = conn is None
    conn = conn or http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    if payload is not None:
        body = json.dumps(payload).encode()
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
    except (ConnectionError, OSError, http.client.HTTPException):
        conn.close()
        return 0, None
    finally:
        if own:
            conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, None


# ----------------------------------------------------------------------------------------------
# The load


def run_load(url: str, queries: list[str], expected: list[float], clients: int, requests: int,
             tolerance: float = 1e-4, timeout: float = 60, keep_latencies: bool = False, headers: dict | None = None,
             body: dict | None = None) -> dict:
    """``requests`` POST /get_reward calls (one query each, plus ``body``'s keys, with ``headers``) from
    ``clients`` threads; every answer's reward checked against ``expected`` for its own query. Returns counts
    and latencies (ms)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies: list[float] = []
    failures = {"errors": 0, "mismatched": 0}
    lock = threading.Lock()
    turns = iter(range(requests))

    def client():
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        while True:
            with lock:
                i = next(turns, None)
            if i is None:
                break
            q = i % len(queries)
            started = time.perf_counter()
            status, answer = request(url, "POST", "/get_reward", {"query": [queries[q]], **(body or {})}, conn=conn,
                                     headers=headers)
            took = time.perf_counter() - started
            with lock:
                if status != 200 or not answer or len(answer.get("rewards", [])) != 1:
                    failures["errors"] += 1
                    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
                elif abs(answer["rewards"][0] - expected[q]) > tolerance:
                    failures["mismatched"] += 1
                else:
                    latencies.append(took)
        conn.close()

    seconds = run_clients(client, clients)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    result = {"clients": clients, "requests": requests, "answered_correctly": len(latencies), **failures,
              "seconds": seconds, "requests_per_s": requests / seconds,
              "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                             "max": float(ms.max())}}
    if keep_latencies:
        result["_latencies_ms"] = ms
    return result


def workload(model_dir: Path, kind: str, n: int, outputs: bool = False):
    """``n`` conversations as templated text (what OpenRLHF sends), their scores from the export (`urm score`'s
    path, in this process; all its outputs by name with ``outputs``) and their token counts. ``synthetic``: the demo's synthetic HelpSteer2-schema
    conversations (138-904 tokens here); ``short``: one-line questions and answers (~30 tokens)."""
    from pipeline.data import load_conversations
    from pipeline.features import encode_texts, pad_id_of, render_texts
    from pipeline.serve import load_scorer, score_ids

    if kind == "synthetic":
        convs = [c.messages for c in load_conversations(f"synthetic:ratings?n={n}&seed=0")[0]]
    else:
        convs = [[{"role": "user", "content": f"What is {i} plus {i % 7}?"},
                  {"role": "assistant", "content": f"It is {i + i % 7}." if i % 3 else f"Maybe {i}."}] for i in range(n)]
    model, tokenizer = load_scorer(str(model_dir), "float32", "cpu")
    texts = render_texts(tokenizer, convs)
    ids = encode_texts(tokenizer, texts)
    out = score_ids(model, ids, 8192, pad_id_of(tokenizer))
    return texts, out if outputs else out["score"].tolist(), [len(x) for x in ids]


def merge(rounds: list[dict]) -> dict:
    """One mode's rounds as one result: counts summed, latency percentiles over every answer."""
    ms = np.concatenate([r.pop("_latencies_ms") for r in rounds])
    seconds = sum(r["seconds"] for r in rounds)
    requests = sum(r["requests"] for r in rounds)
    return {"clients": rounds[0]["clients"], "requests": requests, "rounds": len(rounds),
            **{k: sum(r[k] for r in rounds) for k in ("answered_correctly", "errors", "mismatched")},
            "seconds": seconds, "requests_per_s": requests / seconds,
            "requests_per_s_by_round": [round(r["requests_per_s"], 1) for r in rounds],
            "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                           "max": float(ms.max())}}


def compare(model_dir: Path, kind: str, args) -> dict:
    """Both modes on one workload: both servers up at once, their rounds interleaved (dynamic, one at a time,
    dynamic, ...) so that a busy spell on this shared machine falls on both alike."""
    queries, expected, lengths = workload(model_dir, kind, args.conversations)
    modes = {"dynamic": ["--max-wait-ms", str(args.max_wait_ms)], "one_at_a_time": ["--no-dynamic-batching"]}
    results: dict = {"query_tokens": {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)}}
    per_round = args.requests // args.rounds
    with serve(model_dir, "--device", "cpu", "--dtype", "float32", *modes["dynamic"]) as (_, dynamic_url), \
            serve(model_dir, "--device", "cpu", "--dtype", "float32", *modes["one_at_a_time"]) as (_, one_url):
        urls = {"dynamic": dynamic_url, "one_at_a_time": one_url}
        rounds: dict[str, list] = {name: [] for name in modes}
        before = {}
        for name, url in urls.items():
            run_load(url, queries, expected, args.clients, min(64, per_round))  # warm-up
            before[name] = request(url, "GET", "/health")[1]["stats"]
        for _ in range(args.rounds):
            for name, url in urls.items():
                rounds[name].append(run_load(url, queries, expected, args.clients, per_round, keep_latencies=True))
        for name, url in urls.items():
            after = request(url, "GET", "/health")[1]["stats"]
            result = merge(rounds[name])
            result["model_calls"] = after["model_calls"] - before[name]["model_calls"]
            result["requests_per_model_call"] = result["requests"] / max(1, result["model_calls"])
            result["largest_call_requests"] = after["largest_call_requests"]
            results[name] = result
            print(f"{kind} {name}: {result['requests_per_s']:.0f} req/s (rounds {result['requests_per_s_by_round']}), "
                  f"p50 {result['latency_ms']['p50']:.1f} ms, p99 {result['latency_ms']['p99']:.1f} ms, "
                  f"{result['model_calls']} model calls, errors {result['errors']}, mismatched {result['mismatched']}",
                  flush=True)
    d, one = results["dynamic"], results["one_at_a_time"]
    results["ratios"] = {"throughput": d["requests_per_s"] / one["requests_per_s"],
                         "p50": d["latency_ms"]["p50"] / one["latency_ms"]["p50"],
                         "p99": d["latency_ms"]["p99"] / one["latency_ms"]["p99"]}
    print(f"{kind}: dynamic batching / one at a time: {results['ratios']['throughput']:.2f}x requests/s, "
          f"p50 {results['ratios']['p50']:.2f}x, p99 {results['ratios']['p99']:.2f}x", flush=True)
    return results


API_KEY = "bench-key"
REWARD_MODES = {  # name -> (urm serve options, request headers, the transform its answers carry)
    "mean": ([], None, "mean"),
    "lcb": (["--reward", "lcb", "--risk", "1"], None, "lcb"),
    "uwo": (["--reward", "uwo", "--risk", "1"], None, "uwo"),
    "mean_api_key": ([], {"Authorization": f"Bearer {API_KEY}"}, "mean"),
}


def compare_rewards(model_dir: Path, kind: str, args) -> dict:
    """The reward transforms side by side, on dynamic batching: every server up at once, rounds interleaved (in
    turn forwards and backwards);
    ``today`` (a server of the --baseline tree) when given, and each mode's ratios to it."""
    from contextlib import ExitStack

    from pipeline.model import rewards_of

    queries, out, lengths = workload(model_dir, kind, args.conversations, outputs=True)
    results: dict = {"query_tokens": {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)}}
    per_round = args.requests // args.rounds
    common = ["--device", "cpu", "--dtype", "float32", "--max-wait-ms", str(args.max_wait_ms)]
    modes = {name: mode for name, mode in REWARD_MODES.items() if name in args.modes.split(",")}
    if args.baseline:
        modes = {"today": ([], None, "mean"), **modes}
    with ExitStack() as stack:
        urls = {}
        for name, (options, headers, _) in modes.items():
            tree = Path(args.baseline) if name == "today" else ROOT
            env = {"URM_API_KEY": API_KEY} if headers else None
            urls[name] = stack.enter_context(serve(model_dir, *common, *options, headers=headers, env=env, tree=tree))[1]
        expected = {name: rewards_of(out, transform, 1.0).tolist() for name, (_, _, transform) in modes.items()}
        rounds: dict[str, list] = {name: [] for name in modes}
        for name, url in urls.items():  # warm-up
            run_load(url, queries, expected[name], args.clients, min(64, per_round), headers=modes[name][1])
        for r in range(args.rounds):  # the order turns round every round: no mode always goes first
            for name in (list(urls) if r % 2 == 0 else list(urls)[::-1]):
                rounds[name].append(run_load(urls[name], queries, expected[name], args.clients, per_round,
                                             keep_latencies=True, headers=modes[name][1]))
    for name in modes:
        results[name] = merge(rounds[name])
        r = results[name]
        print(f"{kind} {name}: {r['requests_per_s']:.0f} req/s (rounds {r['requests_per_s_by_round']}), p50 "
              f"{r['latency_ms']['p50']:.1f} ms, p99 {r['latency_ms']['p99']:.1f} ms, errors {r['errors']}, "
              f"mismatched {r['mismatched']}", flush=True)
    reference = "today" if args.baseline else "mean"
    ref = results[reference]
    results["ratios_to_" + reference] = {
        name: {"throughput": results[name]["requests_per_s"] / ref["requests_per_s"],
               "throughput_paired_median": float(np.median(np.array(results[name]["requests_per_s_by_round"]) /
                                                           np.array(ref["requests_per_s_by_round"]))),
               "p50": results[name]["latency_ms"]["p50"] / ref["latency_ms"]["p50"],
               "p99": results[name]["latency_ms"]["p99"] / ref["latency_ms"]["p99"]} for name in modes}
    print(f"{kind}: requests/s relative to {reference} (overall; median of the rounds' ratios): " + ", ".join(
        f"{n} {v['throughput']:.2f}x; {v['throughput_paired_median']:.2f}x"
        for n, v in results["ratios_to_" + reference].items()), flush=True)
    results["answer_us"] = answer_cost(out)
    return results


def answer_cost(out: dict) -> dict:
    """What the transforms add to one request in the server's process, without the noise of a loaded
    machine: microseconds (median of 20 x 2000 calls) to read the request's choice and build /get_reward's
    answer for one row, under each transform, beside the answer built the way it was before them."""
    import timeit

    from pipeline.serve import RewardChoice, reward_choice, rewards

    one = {name: values[:1] for name, values in out.items()}

    def before():  # the answer before the transforms: plain lists of the score and its spread
        scores = one["score"].tolist()
        logs = {"score_std": one["score_std"].tolist(), "ensemble_std": one["ensemble_std"].tolist()}
        return {"rewards": scores, "scores": scores, "extra_logs": logs}

    def now(name):
        choice = reward_choice({"query": ["q"]}, RewardChoice(name, 1.0), 2)
        return rewards(one, choice)

    def us(fn):
        return float(np.median(timeit.repeat(fn, number=2000, repeat=20))) / 2000 * 1e6

    return {"before": us(before), **{name: us(lambda name=name: now(name)) for name in ("mean", "lcb", "uwo")}}


def main_rewards(model_dir: Path, args, what: str) -> None:
    load_before = os.getloadavg()
    workloads = {kind: compare_rewards(model_dir, kind, args) for kind in ("short", "synthetic")}
    lost = sum(w[m]["errors"] + w[m]["mismatched"] for w in workloads.values() for m in w
               if isinstance(w[m], dict) and "errors" in w[m])
    print(f"lost or wrong answers: {lost}")
    write_result("serve_load_rewards", {
        "what": f"urm serve's reward transforms side by side (dynamic batching), POST /get_reward with one templated "
                f"query per request, {what}; 'today' is a server run from the --baseline tree",
        "config": vars(args), "workloads": workloads, "lost_or_wrong": lost,
        "machine": {**machine_info(), "load_average_before": list(load_before)},
    })


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench serve_load")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=800, help="requests per mode, spread over the clients")
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=4, help="rounds per mode, interleaved between the two servers")
    p.add_argument("--model", default=None, help="serve this export instead of the tiny one (e.g. runs/demo/model, "
                   "SmolLM2 after `make demo`); the result goes to serve_load_export.json")
    p.add_argument("--rewards", action="store_true", help="compare the reward transforms instead (mean, lcb, uwo, "
                   "mean behind --api-key); the result goes to serve_load_rewards.json")
    p.add_argument("--modes", default=",".join(REWARD_MODES), help="with --rewards: which of "
                   f"{', '.join(REWARD_MODES)} to serve")
    p.add_argument("--baseline", default=None, help="with --rewards: a checkout of the code before the transforms, "
                   "served beside them as 'today'")
    args = p.parse_args(argv)
    if args.model is not None and not args.rewards:
        return main_export(Path(args.model), args)

    sys.path.insert(0, str(ROOT / "tests"))  # the tiny export builder the tests use
    from tiny_models import export_tiny

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.rewards:
            model_dir = Path(args.model) if args.model else export_tiny(Path(tmp), reward_model=True, members=2)[2]
            what = (f"the export {model_dir}" if args.model else
                    "tiny random Llama export (d=64, 2 layers, 2-member ensemble, URM gate)") + ", float32 on CPU"
            return main_rewards(model_dir, args, what)
        _, _, model_dir = export_tiny(Path(tmp), reward_model=True, members=2)
        workloads = {kind: compare(model_dir, kind, args) for kind in ("short", "synthetic")}
    lost = sum(w[m]["errors"] + w[m]["mismatched"] for w in workloads.values() for m in ("dynamic", "one_at_a_time"))
    print(f"lost or wrong answers: {lost}")
    write_result("serve_load", {
        "what": "urm serve on loopback, POST /get_reward with one templated query per request (OpenRLHF's way), "
                "tiny random Llama export (d=64, 2 layers, 2-member ensemble, URM gate), float32 on CPU; clients "
                "and server share the machine's cores",
        "config": vars(args), "workloads": workloads, "lost_or_wrong": lost,
        "machine": {**machine_info(), "load_average_before": list(load_before)},
    })


def main_export(model_dir: Path, args) -> None:
    """The same comparison on a real export (where a model call costs what a real backbone's does)."""
    from pipeline.serve import check_export

    check_export(model_dir, verify=True)
    load_before = os.getloadavg()
    workloads = {kind: compare(model_dir, kind, args) for kind in ("short", "synthetic")}
    lost = sum(w[m]["errors"] + w[m]["mismatched"] for w in workloads.values() for m in ("dynamic", "one_at_a_time"))
    config = json.loads((model_dir / "config.json").read_text())
    print(f"lost or wrong answers: {lost}")
    write_result("serve_load_export", {
        "what": f"urm serve on loopback, POST /get_reward with one templated query per request (OpenRLHF's way), "
                f"the export {model_dir} ({config.get('model_type')}, hidden size {config.get('hidden_size')}, "
                f"{config.get('num_hidden_layers')} layers), float32 on CPU; clients and server share the machine's cores",
        "config": {**vars(args), "model": str(model_dir)}, "workloads": workloads, "lost_or_wrong": lost,
        "machine": {**machine_info(), "load_average_before": list(load_before)},
    })
