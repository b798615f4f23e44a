"""`urm serve` in a subprocess on loopback, through a real HTTP client (http.client): its scores against
`urm score` and the export's own logits, a short bounded load (no lost or swapped answers), a few hundred
fuzzed bad requests (always a 4xx, the server still serving right afterwards), a full queue (503) and
SIGTERM with a request in flight (it finishes, the server exits 0). Every server picks a free port
(--port 0) and is stopped in a finally (bench.serve_load.serve); every request has a timeout."""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time

import pytest
import torch

from bench.serve_load import request, run_load, serve
from pipeline.features import render_ids, render_texts
from test_score import urm_score
from tiny_models import CONVERSATIONS, export_tiny, load_export, tokenizer_of

pytestmark = pytest.mark.integration

MAX_BODY_MB = 0.05  # 52,428 bytes: oversized bodies stay cheap to send
MAX_ITEMS = 16
CONVS = CONVERSATIONS + [
    [{"role": "user", "content": "Is the output of a sigmoid bounded?"}, {"role": "assistant", "content": f"Yes, {a}."}]
    for a in ("between 0 and 1", "between -1 and 1", "it is bounded above and below")]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny reward-model backbone, 2-member ensemble + URM gate, exported."""
    return export_tiny(tmp_path_factory.mktemp("serve"), reward_model=True, members=2)[2]


@pytest.fixture(scope="module")
def expected(export):
    """The export's own outputs for CONVS, one conversation at a time, and the templated texts."""
    model, tokenizer = load_export(export), tokenizer_of(export)
    with torch.no_grad():
        outs = [model(torch.tensor([x])) for x in render_ids(tokenizer, CONVS)]
    return {"texts": render_texts(tokenizer, CONVS), "score": [o.logits[0, 0].item() for o in outs],
            "score_std": [o.score_std[0].item() for o in outs], "ensemble_std": [o.ensemble_std[0].item() for o in outs]}


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with serve(export, "--device", "cpu", "--dtype", "float32", "--max-body-mb", str(MAX_BODY_MB),  # as `expected`
               "--max-items", str(MAX_ITEMS), log_path=log) as (proc, url):
        yield url


def scores_are_right(url: str, expected: dict) -> None:
    status, got = request(url, "POST", "/score", {"conversations": CONVS + expected["texts"]}, timeout=60)
    assert status == 200, got
    n = len(CONVS)
    for key in ("score", "score_std", "ensemble_std"):
        values = [r[key] for r in got["results"]]
        assert values[:n] == pytest.approx(expected[key], abs=1e-5)  # message lists
        assert values[n:] == pytest.approx(expected[key], abs=1e-5)  # the same, templated


def test_scores_over_http_equal_urm_score_and_the_models_own(server, expected, export, write_jsonl):
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["model"]["attributes"] == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    assert health["model"]["members"] == 2 and health["model"]["max_length"] == 1024
    scores_are_right(server, expected)
    status, got = request(server, "POST", "/score", {"conversations": CONVS})
    cli = urm_score(export, write_jsonl("convs.jsonl", [{"id": str(i), "messages": c} for i, c in enumerate(CONVS)]))
    for http_row, cli_row in zip(got["results"], cli):
        assert http_row.pop("tokens") > 0
        cli_row.pop("id")
        assert http_row.keys() == cli_row.keys()
        for key, value in cli_row.items():  # every field: score, std, per-attribute means/stds/weights, ensemble
            assert http_row[key] == pytest.approx(value, abs=1e-5), key
    # OpenRLHF's request, with its prompts and labels, and its answer's shape (openrlhf/utils/agent.py)
    body = {"query": expected["texts"], "prompts": ["p"] * len(CONVS), "labels": [None] * len(CONVS)}
    status, got = request(server, "POST", "/get_reward", body)
    assert status == 200 and set(got) == {"rewards", "scores", "transform", "extra_logs"}
    assert got["rewards"] == pytest.approx(expected["score"], abs=1e-5) and got["scores"] == got["rewards"]
    assert got["transform"] == {"reward": "mean", "risk": None}
    assert got["extra_logs"]["score_std"] == pytest.approx(expected["score_std"], abs=1e-5)
    assert got["extra_logs"]["ensemble_std"] == pytest.approx(expected["ensemble_std"], abs=1e-5)


def test_a_request_names_its_reward_transform(server, expected):
    n = len(CONVS)
    score, std = expected["score"], expected["score_std"]
    status, got = request(server, "POST", "/get_reward", {"query": expected["texts"], "reward": "lcb", "risk": 2})
    assert status == 200 and got["transform"] == {"reward": "lcb", "risk": 2.0}
    assert got["rewards"] == pytest.approx([s - 2 * d for s, d in zip(score, std)], abs=1e-5)
    assert got["scores"] == pytest.approx(score, abs=1e-5)  # the plain score beside the transform
    assert got["extra_logs"]["transform_lcb"] == [1.0] * n and got["extra_logs"]["risk"] == [2.0] * n
    status, got = request(server, "POST", "/score", {"conversations": CONVS, "reward": "uwo", "risk": 0.5})
    assert status == 200 and got["transform"] == {"reward": "uwo", "risk": 0.5}
    for r in got["results"]:
        members = r["ensemble_scores"]
        assert r["reward"] == pytest.approx(sum(members) / len(members) - 0.5 * r["ensemble_std"] ** 2, abs=1e-5)
    status, got = request(server, "POST", "/get_reward", {"query": expected["texts"], "reward": "min"})
    assert status == 200 and got["transform"] == {"reward": "min", "risk": None} and "risk" not in got["extra_logs"]
    status, again = request(server, "POST", "/score", {"conversations": CONVS})
    assert got["rewards"] == pytest.approx([min(r["ensemble_scores"]) for r in again["results"]], abs=1e-5)
    status, got = request(server, "POST", "/get_reward", {"query": expected["texts"][:1], "risk": -1})
    assert status == 422 and "'risk' must be a number from 0 to 1e6" in got["error"]


def test_a_bounded_load_loses_and_swaps_nothing(server, expected):
    result = run_load(server, expected["texts"], expected["score"], clients=4, requests=48, timeout=60)
    assert (result["errors"], result["mismatched"], result["answered_correctly"]) == (0, 0, 48), result


# ----------------------------------------------------------------------------------------------
# Fuzzed bad requests


def junk(rng: random.Random):
    """A value of a random JSON type (or deeper)."""
    return rng.choice([None, True, 0, -1, 3.5, 1e308, "", "x" * rng.randrange(1, 20), [], {}, [1, "a"],
                       {"role": 1}, [[[]]], {"query": None}])


def bad_requests(rng: random.Random, texts: list[str], n: int) -> list[tuple[str, str, str, bytes, dict]]:
    """``n`` (what, method, path, body, headers) that the server must refuse with a 4xx."""
    good = {"/get_reward": {"query": texts[:2], "prompts": ["p", "q"], "labels": [None, None]},
            "/score": {"conversations": [CONVS[0], texts[1]]}}
    makers = []

    def case(fn):
        makers.append(fn)
        return fn

    @case
    def truncated(path):
        body = json.dumps(good[path]).encode()
        return "truncated JSON", "POST", path, body[: rng.randrange(1, len(body) - 1)], {}

    @case
    def random_bytes(path):
        return "random bytes", "POST", path, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), {}

    @case
    def not_utf8(path):
        return "not UTF-8", "POST", path, json.dumps(good[path]).encode("utf-16"), {}

    @case
    def wrong_top(path):
        return "wrong top-level type", "POST", path, json.dumps(junk(rng)).encode(), {}

    @case
    def wrong_list(path):
        key = "query" if path == "/get_reward" else "conversations"
        return f"{key} not a list", "POST", path, json.dumps({key: rng.choice([None, 1, "text", {"a": 1}])}).encode(), {}

    @case
    def wrong_item(path):
        key = "query" if path == "/get_reward" else "conversations"
        items = list(good[path][key])
        items.insert(rng.randrange(len(items) + 1), rng.choice([None, 1, 2.5, True, {}, [], "", " ", [[]], [1]]))
        return f"bad item in {key}", "POST", path, json.dumps({key: items}).encode(), {}

    @case
    def bad_message(path):
        message = rng.choice([{"role": "robot", "content": "x"}, {"role": "user"}, {"content": "x"},
                              {"role": "user", "content": 5}, {"role": "assistant", "content": None}, "hello", 3])
        conv = [{"role": "user", "content": "q"}, message] if rng.random() < 0.5 else [message]
        return "bad message", "POST", "/score", json.dumps({"conversations": [conv]}).encode(), {}

    @case
    def ends_with_user(path):
        return "ends with a user turn", "POST", "/score", json.dumps(
            {"conversations": [CONVS[0] + [{"role": "user", "content": "and?"}]]}).encode(), {}

    @case
    def empty(path):
        key = "query" if path == "/get_reward" else "conversations"
        return "empty list", "POST", path, json.dumps({key: []}).encode(), {}

    @case
    def too_many(path):
        key = "query" if path == "/get_reward" else "conversations"
        return "too many items", "POST", path, json.dumps({key: [texts[0]] * (MAX_ITEMS + rng.randrange(1, 5))}).encode(), {}

    @case
    def too_long(path):
        text = texts[0] + " ".join(rng.choice(["sigmoid", "bounded", "gradient", "Paris"]) for _ in range(1500))
        key = "query" if path == "/get_reward" else "conversations"
        return "over max length", "POST", path, json.dumps({key: [texts[1], text]}).encode(), {}

    @case
    def too_big(path):
        key = "query" if path == "/get_reward" else "conversations"
        body = json.dumps({key: ["x" * int(MAX_BODY_MB * 2**20 * rng.uniform(1.05, 2))]}).encode()
        return "body over the limit", "POST", path, body, {}

    @case
    def claims_too_big(path):
        return "Content-Length over the limit", "POST", path, b"{}", {"Content-Length": str(10**9)}

    @case
    def nested(path):
        depth = rng.randrange(2_000, 20_000)
        return "nested too deeply", "POST", path, b"[" * depth + b"]" * depth, {}

    @case
    def bad_transform(path):
        key = "query" if path == "/get_reward" else "conversations"
        field, value = rng.choice([("reward", "max"), ("reward", None), ("reward", 3), ("reward", "LCB"), ("risk", -1),
                                   ("risk", "1"), ("risk", float("inf")), ("risk", None), ("risk", [1])])
        return f"bad {field}", "POST", path, json.dumps({key: good[path][key], field: value}).encode(), {}

    @case
    def wrong_route(path):
        method, route = rng.choice([("GET", "/score"), ("GET", "/get_reward"), ("POST", "/health"), ("POST", "/"),
                                    ("DELETE", "/score"), ("GET", "/admin"), ("PUT", "/get_reward")])
        return "wrong method or path", method, route, b"{}", {}

    return [rng.choice(makers)(rng.choice(list(good))) for _ in range(n)]


def test_fuzzed_bad_requests_get_4xx_and_the_server_keeps_serving(server, expected):
    rng = random.Random(0)
    cases = bad_requests(rng, expected["texts"], 300)
    assert len({what for what, *_ in cases}) >= 15  # every kind of mistake was made
    wrong = []
    for what, method, path, body, headers in cases:
        status, answer = request(server, method, path, body=body, headers=headers, timeout=30)
        if not 400 <= status < 500 or not (answer and answer.get("error")):
            wrong.append((what, method, path, status, answer, body[:80]))
    assert not wrong, wrong[:5]
    # and below HTTP: request lines that are not HTTP, a body that never comes in full
    for raw in (b"GARBAGE\r\n\r\n", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                b"\x00\xff" * 100, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"conv"):
        host, port = server.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            try:
                s.recv(1000)
            except OSError:
                pass
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    scores_are_right(server, expected)


# ----------------------------------------------------------------------------------------------
# Overload and shutdown


def test_a_full_queue_is_503_and_sigterm_lets_the_request_in_flight_finish(export, expected, tmp_path):
    options = ["--device", "cpu", "--dtype", "float32", "--max-items", "3", "--max-queue", "4", "--max-wait-ms", "3000",
               "--max-tokens-per-batch", "100000"]  # the first request waits 3 s for company
    log = tmp_path / "serve.log"
    with serve(export, *options, log_path=log) as (proc, url):
        first = {}
        sender = threading.Thread(target=lambda: first.update(
            answer=request(url, "POST", "/score", {"conversations": CONVS[:3]}, timeout=60)))
        sender.start()
        deadline = time.monotonic() + 30
        while request(url, "GET", "/health")[1]["stats"]["queued"] != 3:
            assert time.monotonic() < deadline, "the first request never reached the queue"
            time.sleep(0.05)
        status, answer = request(url, "POST", "/score", {"conversations": CONVS[3:5]})
        assert status == 503 and "the queue is full (3 conversations waiting, at most 4)" in answer["error"]
        proc.send_signal(signal.SIGTERM)  # the first request is still waiting for its batch
        sender.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    status, answer = first["answer"]
    assert status == 200, answer
    assert [r["score"] for r in answer["results"]] == pytest.approx(expected["score"][:3], abs=1e-5)
    assert "urm serve: stopped" in log.read_text() and "Traceback" not in log.read_text()


# ----------------------------------------------------------------------------------------------
# Who may call: --api-key / URM_API_KEY


KEY = "k3y-for-tests_0123456789"


def calls(url: str, key: str) -> dict:
    """The server's request count, read with the key."""
    return request(url, "GET", "/health", headers={"Authorization": f"Bearer {key}"})[1]["stats"]["requests"]


def test_with_a_key_a_request_without_it_is_401_and_never_scored(export, expected, tmp_path):
    log = tmp_path / "serve.log"
    good = {"Authorization": f"Bearer {KEY}"}
    with serve(export, "--device", "cpu", "--dtype", "float32", "--reward", "lcb", "--risk", "1", headers=good, log_path=log,
               env={"URM_API_KEY": KEY}) as (_, url):
        body = {"query": expected["texts"][:2]}
        before = calls(url, KEY)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": f"Bearer {KEY}x"}, {"X-Api-Key": KEY}):
            for method, path, payload in (("POST", "/get_reward", body), ("POST", "/score", {"conversations": CONVS}),
                                          ("GET", "/health", None)):
                status, got = request(url, method, path, payload, headers=headers)
                assert status == 401 and "Authorization: Bearer <key>" in got["error"], (headers, path, got)
                assert KEY not in json.dumps(got)
        assert calls(url, KEY) == before  # nothing reached the model
        status, got = request(url, "POST", "/get_reward", body, headers=good)
        assert status == 200 and got["transform"] == {"reward": "lcb", "risk": 1.0}  # the server's --reward
        want = [s - d for s, d in zip(expected["score"][:2], expected["score_std"][:2])]
        assert got["rewards"] == pytest.approx(want, abs=1e-5)
        assert calls(url, KEY) == before + 1
        status, health = request(url, "GET", "/health", headers=good)
        assert health["api_key"] is True and health["reward"] == {"reward": "lcb", "risk": 1.0}
        assert KEY not in json.dumps(health)
    text = log.read_text()
    assert KEY not in text and "Traceback" not in text


def test_health_open_only_when_asked_and_off_loopback_without_a_key_warns(export, expected, tmp_path):
    log = tmp_path / "open.log"
    with serve(export, "--device", "cpu", "--dtype", "float32", "--host", "0.0.0.0", "--api-key", KEY, "--open-health",
               log_path=log) as (_, url):
        status, health = request(url, "GET", "/health")
        assert status == 200 and health["api_key"] is True
        status, got = request(url, "POST", "/get_reward", {"query": expected["texts"][:1]})
        assert status == 401
    assert "warning" not in log.read_text()  # a key is set: nothing to warn about
    log = tmp_path / "bare.log"
    with serve(export, "--device", "cpu", "--dtype", "float32", "--host", "0.0.0.0", log_path=log) as (_, url):
        status, got = request(url, "POST", "/get_reward", {"query": expected["texts"][:1]})
        assert status == 200 and got["rewards"] == pytest.approx(expected["score"][:1], abs=1e-5)
    assert "warning: listening on 0.0.0.0, not loopback: the server has no authentication" in log.read_text()
