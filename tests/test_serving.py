"""pipeline.serve without a server: the request checks and their messages, and the dynamic-batching queue
(requests that arrive together share a model call, each gets its own rows back, the queue is bounded)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.serve import Batcher, Limits, RequestError, check_lengths, parse_json, reward_queries, score_items

LIMITS = Limits(max_items=3, max_queue=8)
TURN = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


def refused(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value


@pytest.mark.parametrize("body, status, says", [
    (b"", 400, "empty request body"),
    (b'{"query": [', 400, "malformed JSON"),
    (b'\xff\xfe{"query"}', 400, "not UTF-8"),
    ('{"query": ["a"]}'.encode("utf-16"), 400, "not UTF-8"),  # json.loads alone would take it
    (b"[" * 100_000, 400, "nested too deeply"),
])
def test_bodies_that_are_not_json_are_400(body, status, says):
    e = refused(parse_json, body)
    assert e.status == status and says in e.message


@pytest.mark.parametrize("payload, status, says", [
    ([1, 2], 422, "expected a JSON object with 'query'"),
    ({"queries": ["a"]}, 422, "missing 'query'"),
    ({"query": "a"}, 422, "'query' must be a list, got str"),
    ({"query": []}, 422, "'query' is empty"),
    ({"query": ["a"] * 4}, 413, "holds 4 items; at most 3 per request"),
    ({"query": ["a", 3]}, 422, "query[1] must be a non-empty string, got int"),
    ({"query": ["a", "  "]}, 422, "query[1] must be a non-empty string"),
])
def test_bad_openrlhf_requests_are_named(payload, status, says):
    e = refused(reward_queries, payload, LIMITS)
    assert e.status == status and says in e.message


def test_openrlhf_requests_may_carry_prompts_and_labels():
    assert reward_queries({"query": ["a", "b"], "prompts": ["p", "q"], "labels": [None, 1]}, LIMITS) == ["a", "b"]


@pytest.mark.parametrize("payload, says", [
    ({"conversations": [TURN, [{"role": "user", "content": "hi"}]]},
     "conversations[1]: field 'messages': the conversation must end with an assistant turn"),
    ({"conversations": [[{"role": "robot", "content": "x"}]]}, "conversations[0]: field 'messages[0].role': unknown role"),
    ({"conversations": [[{"role": "user"}]]}, "conversations[0]: field 'messages[0].content'"),
    ({"conversations": [7]}, "conversations[0]: field 'messages': expected a non-empty list"),
    ({"conversations": [[]]}, "conversations[0]: field 'messages': expected a non-empty list"),
    ({"conversations": [""]}, "conversations[0]: empty text"),
])
def test_bad_conversations_are_named(payload, says):
    e = refused(score_items, payload, LIMITS)
    assert e.status == 422 and says in e.message, e.message


def test_conversations_come_as_message_lists_objects_or_text():
    got = score_items({"conversations": [TURN, {"messages": TURN, "id": "x"}, "<s>templated</s>"]}, LIMITS)
    assert got == [TURN, TURN, "<s>templated</s>"]


def test_too_long_is_422_naming_the_item():
    check_lengths([[1] * 5, [1] * 6], 6, "query")
    e = refused(check_lengths, [[1] * 5, [1] * 7], 6, "query")
    assert e.status == 422 and "query[1] is 7 tokens, longer than max_length=6" in e.message


# ----------------------------------------------------------------------------------------------
# The batcher, with a real (if simple) score function: each row's sum and length


class Recorder:
    """Scores a row as (sum of its ids, its length); records every call's rows."""

    def __init__(self):
        self.calls: list[list[list[int]]] = []

    def __call__(self, ids):
        self.calls.append(ids)
        return {"score": np.array([sum(x) for x in ids], dtype=np.float32),
                "length": np.array([[len(x)] for x in ids], dtype=np.float32)}


async def submit_together(batcher: Batcher, requests: list[list[list[int]]]):
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
    finally:
        await batcher.stop()


REQUESTS = [[[1, 2, 3]], [[10] * 4, [20] * 2], [[5] * 7]]  # three requests, four rows


def test_requests_arriving_together_share_one_call_and_get_their_own_rows():
    score = Recorder()
    got = asyncio.run(submit_together(Batcher(score, max_tokens=1000, max_wait_s=0.5, max_queue=8), REQUESTS))
    assert len(score.calls) == 1 and len(score.calls[0]) == 4  # one model call for all three
    for request, out in zip(REQUESTS, got):
        assert out["score"].tolist() == [sum(x) for x in request]
        assert out["length"][:, 0].tolist() == [len(x) for x in request]


def test_without_dynamic_batching_each_request_is_its_own_call():
    score = Recorder()
    got = asyncio.run(submit_together(Batcher(score, 1000, 0.5, 8, batching=False), REQUESTS))
    assert [len(c) for c in score.calls] == [1, 2, 1]
    assert [o["score"].tolist() for o in got] == [[6], [40, 40], [35]]


def test_a_call_takes_requests_while_their_tokens_fit_the_budget():
    score = Recorder()
    got = asyncio.run(submit_together(Batcher(score, max_tokens=12, max_wait_s=0.5, max_queue=8), REQUESTS))
    assert [sum(map(len, c)) for c in score.calls] == [9, 7]  # 3 + 6 tokens, then the 7-token request
    assert [o["score"].tolist() for o in got] == [[6], [40, 40], [35]]


def test_a_full_queue_is_503_and_the_rest_are_served():
    score = Recorder()
    got = asyncio.run(submit_together(Batcher(score, 1000, 0.5, max_queue=3), REQUESTS))
    assert got[0]["score"].tolist() == [6] and got[1]["score"].tolist() == [40, 40]
    assert isinstance(got[2], RequestError) and got[2].status == 503 and "queue is full" in got[2].message


def test_a_failing_model_call_fails_its_requests_only():
    calls = []

    def flaky(ids):
        calls.append(ids)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return Recorder()(ids)

    async def run():
        batcher = Batcher(flaky, 1000, 0.0, 8)
        batcher.start()
        try:
            first = await asyncio.gather(batcher.submit([[1]]), return_exceptions=True)
            second = await batcher.submit([[2, 3]])
            return first[0], second
        finally:
            await batcher.stop()

    first, second = asyncio.run(run())
    assert isinstance(first, RuntimeError) and second["score"].tolist() == [5]


# ----------------------------------------------------------------------------------------------
# The command's own errors, before any server runs


runner = CliRunner()


def test_serve_options_are_checked_before_anything_loads(tmp_path):
    result = runner.invoke(app, ["serve", str(tmp_path), "--max-items", "10", "--max-queue", "5"])
    assert result.exit_code == 2 and "--max-queue must be at least --max-items (10)" in result.output
    result = runner.invoke(app, ["serve", str(tmp_path), "--port", "70000"])
    assert result.exit_code == 2 and "--port must be at most 65535" in result.output


def test_serving_something_that_is_not_an_export_is_one_line(tmp_path):
    result = runner.invoke(app, ["serve", str(tmp_path), "--port", "0"])
    assert result.exit_code == 1 and "no config.json, so not a model directory" in result.output
    assert "Traceback" not in result.output


def test_a_taken_port_is_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output


def test_health_and_results_are_json_of_the_scoring_rows():
    from pipeline.serve import RewardChoice, results, rewards

    out = {"score": np.array([1.5, -2.0], dtype=np.float32), "score_std": np.array([0.5, 0.25], dtype=np.float32),
           "attribute_means": np.array([[1, 2], [3, 4]], dtype=np.float32),
           "ensemble_std": np.array([0.1, 0.2], dtype=np.float32)}
    rows = results(out, ["a", "b"], [[1, 2, 3], [4]])
    assert rows[1] == {"score": -2.0, "score_std": 0.25, "attribute_means": {"a": 3.0, "b": 4.0},
                       "ensemble_std": pytest.approx(0.2), "reward": -2.0, "tokens": 1}
    assert json.loads(json.dumps(rewards(out))) == {
        "rewards": [1.5, -2.0], "scores": [1.5, -2.0], "transform": {"reward": "mean", "risk": None},
        "extra_logs": {"score_std": [0.5, 0.25], "ensemble_std": [pytest.approx(0.1), pytest.approx(0.2)],
                       "transform_mean": [1.0, 1.0]}}
    lcb = RewardChoice("lcb", 2.0)  # score - 2 x score_std: 1.5 - 1.0, -2.0 - 0.5
    assert [r["reward"] for r in results(out, ["a", "b"], [[1], [2]], lcb)] == [0.5, -2.5]
    got = json.loads(json.dumps(rewards(out, lcb)))
    assert got["rewards"] == [0.5, -2.5] and got["scores"] == [1.5, -2.0]
    assert got["transform"] == {"reward": "lcb", "risk": 2.0}
    assert got["extra_logs"]["transform_lcb"] == [1.0, 1.0] and got["extra_logs"]["risk"] == [2.0, 2.0]
    # OpenRLHF makes a tensor of every extra_logs value (samples_generator.py): numbers only
    assert all(torch.tensor([v]).dtype.is_floating_point for v in got["extra_logs"].values())
    epistemic = {**out, "epistemic_std": np.array([0.25, 1.0], dtype=np.float32)}
    elcb = RewardChoice("elcb", 2.0)  # score - 2 x epistemic_std: 1.5 - 0.5, -2.0 - 2.0
    assert [r["reward"] for r in results(epistemic, ["a", "b"], [[1], [2]], elcb)] == [1.0, -4.0]
    got = json.loads(json.dumps(rewards(epistemic, elcb)))
    assert got["rewards"] == [1.0, -4.0] and got["extra_logs"]["epistemic_std"] == [0.25, 1.0]


# ----------------------------------------------------------------------------------------------
# A request's reward transform, and the API key


def test_a_request_may_name_its_own_transform():
    from pipeline.serve import RewardChoice, reward_choice

    server = RewardChoice("lcb", 0.5)
    assert reward_choice({"query": ["a"]}, server, members=1) == server
    assert reward_choice({"query": ["a"], "risk": 2}, server, members=1) == RewardChoice("lcb", 2.0)
    assert reward_choice({"query": ["a"], "reward": "uwo"}, server, members=3) == RewardChoice("uwo", 0.5)
    assert reward_choice({"query": ["a"], "reward": "elcb"}, server, 1, posterior=True) == RewardChoice("elcb", 0.5)
    assert reward_choice({"query": ["a"], "reward": "mean"}, server, members=1).as_json() == {"reward": "mean",
                                                                                            "risk": None}


@pytest.mark.parametrize("payload, says", [
    ({"reward": "max"}, "'reward' must be one of mean, lcb, elcb, min, uwo, got str 'max'"),
    ({"reward": None}, "'reward' must be one of"),
    ({"risk": -1}, "'risk' must be a number from 0 to 1e6, got int -1"),
    ({"risk": "1"}, "'risk' must be a number from 0 to 1e6"),
    ({"risk": True}, "'risk' must be a number from 0 to 1e6"),
    ({"reward": "min"}, "reward 'min' needs an ensemble, and this export has 1 value head"),
    ({"reward": "uwo", "risk": 1}, "reward 'uwo' needs an ensemble"),
    ({"reward": "elcb"}, "reward 'elcb' needs the heads' ridge posterior (epistemic_std), and this export has none"),
])
def test_a_transform_the_request_cannot_get_is_422(payload, says):
    from pipeline.serve import RewardChoice, reward_choice

    e = refused(reward_choice, {"query": ["a"], **payload}, RewardChoice(), 1)
    assert e.status == 422 and says in e.message, e.message


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer wrong", "Basic s3cret", "Bearer s3cret2",
                                    "Bearer s3cre", "s3cret", "Bearer \xe9t\xe9"])
def test_without_the_right_bearer_key_it_is_401(header):
    from pipeline.serve import check_key

    e = refused(check_key, header, "s3cret")
    assert e.status == 401 and "Authorization: Bearer <key>" in e.message and "s3cret" not in e.message


def test_the_right_bearer_key_passes_through_a_constant_time_compare(monkeypatch):
    import hmac

    from pipeline.serve import check_key

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    for header in ("Bearer s3cret", "bearer s3cret", "Bearer  s3cret "):
        check_key(header, "s3cret")
    assert compared == [(b"s3cret", b"s3cret")] * 3


def test_serve_options_for_rewards_and_keys_are_checked_before_anything_loads(tmp_path):
    for args, says in ((["--reward", "best"], "--reward must be one of mean, lcb, elcb, min, uwo"),
                       (["--risk", "-1"], "--risk must be a number from 0 to 1e6, got -1.0"),
                       (["--risk", "nan"], "--risk must be a number from 0 to 1e6"),
                       (["--risk", "1e308"], "--risk must be a number from 0 to 1e6, got 1e+308"),
                       (["--max-wait-ms", "1e308"], "--max-wait-ms must be a number of milliseconds from 0 to 60000"),
                       (["--max-body-mb", "1e308"], "--max-body-mb must be a positive number of MiB, at most 65536"),
                       (["--api-key", "two words"], "--api-key (or URM_API_KEY) must be")):
        result = runner.invoke(app, ["serve", str(tmp_path), *args])
        assert result.exit_code == 2 and says in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["serve", str(tmp_path)], env={"URM_API_KEY": "bad key"})
    assert result.exit_code == 2 and "--api-key (or URM_API_KEY)" in result.output and "bad key" not in result.output
