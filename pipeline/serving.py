"""Serving an exported model over HTTP: request checks, the dynamic-batching queue, and the FastAPI app.

``create_app(service, limits)`` builds the app that `urm serve` runs under uvicorn:

  POST /score        {"conversations": [[{role, content}, ...] | "templated text", ...]}
                     -> {"attributes": [...], "results": [{score, score_std, attribute_means, attribute_stds,
                        gating_weights, (ensemble_scores, ensemble_std, base_score), tokens}, ...]}
  POST /get_reward   OpenRLHF's remote reward-model protocol: {"query": [str, ...], "prompts": ..., "labels": ...}
                     -> {"rewards": [...], "scores": [...], "extra_logs": {"score_std": [...], ...}}
  GET  /health       {"status": "ok", "model": {...}, "limits": {...}, "stats": {...}}

OpenRLHF's protocol, as read in OpenRLHF/OpenRLHF at 3c3be62 (2026-08-13): the trainer
(openrlhf/utils/agent.py, ``SingleTurnAgentExecutor._fetch_rewards_via_http``) POSTs
``{"query": [...], "prompts": [...], "labels": [...]}`` per sample (the query is prompt + response
decoded with ``skip_special_tokens=False``: chat-templated text) to ``--reward.remote_url``, with a
180 s timeout and 5 tries, and reads ``rewards``, ``scores`` (else ``rewards``) and ``extra_logs``
from the JSON answer; its own server (openrlhf/cli/serve_rm.py, ``POST /get_reward``) answers
``{"rewards": r, "scores": r, "extra_logs": {...}}``. ``prompts`` and ``labels`` are accepted and
not used here (a reward model scores the query alone).

Every conversation goes through the code `urm score` runs: ``pipeline.render`` for the token ids
(templated strings by ``encode_texts``, the same rule), ``pipeline.scoring.score_ids`` for the
token-budget batches and ``row_scores`` for the JSON, so the numbers are `urm score`'s. The
``Batcher`` gathers the requests that arrive within ``max_wait`` of the first (until their tokens
fill the budget), runs one model call at a time in its own thread, and hands each request back its
own rows. Request bodies, items per request and queued rows are bounded: too big is 413, a full
queue 503, anything malformed 400 or 422, each with ``{"error": "..."}`` naming what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.preferences import check_ends_with_assistant, messages_from
from pipeline.sources import RowError

# ----------------------------------------------------------------------------------------------
# Request checks: a bad request is a RequestError (HTTP status + one clear message), never a crash


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx, or 503 when full) and a message saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    """What one request, and the queue, may hold."""

    max_items: int = 256
    max_queue: int = 4096
    max_body_bytes: int = 16 << 20
    body_timeout_s: float = 30.0


def parse_json(body: bytes) -> Any:
    """The request body as JSON (400 when it is not UTF-8, not JSON, or nested too deeply)."""
    if not body.strip():
        raise RequestError(400, "empty request body: send a JSON object")
    try:  # UTF-8 only (RFC 8259), though json.loads would guess UTF-16 / 32 from bytes
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not UTF-8 (byte {e.start}): send JSON text") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None


def _kind(value) -> str:
    return f"{type(value).__name__} {value!r}"[:60]


def items_list(payload, key: str, limits: Limits) -> list:
    """``payload[key]``: a non-empty list of at most ``limits.max_items`` items (422 / 413 otherwise)."""
    if not isinstance(payload, dict):
        raise RequestError(422, f"expected a JSON object with {key!r}, got {_kind(payload)}")
    if key not in payload:
        raise RequestError(422, f"missing {key!r}; the object has {sorted(map(str, payload))[:8]}")
    items = payload[key]
    if not isinstance(items, list):
        raise RequestError(422, f"{key!r} must be a list, got {_kind(items)}")
    if not items:
        raise RequestError(422, f"{key!r} is empty: send at least one item")
    if len(items) > limits.max_items:
        raise RequestError(413, f"{key!r} holds {len(items)} items; at most {limits.max_items} per request "
                                "(split it, or start the server with a larger --max-items)")
    return items


def score_items(payload, limits: Limits) -> list[list[dict] | str]:
    """POST /score's ``conversations``: each a message list ending with the assistant turn, or templated text."""
    items = items_list(payload, "conversations", limits)
    out = []
    for i, item in enumerate(items):
        where = f"conversations[{i}]"
        if isinstance(item, str):
            if not item.strip():
                raise RequestError(422, f"{where}: empty text")
            out.append(item)
            continue
        if isinstance(item, dict) and "messages" in item:
            item = item["messages"]
        try:
            out.append(check_ends_with_assistant(messages_from(item, "messages"), "messages"))
        except RowError as e:
            raise RequestError(422, f"{where}: {e}") from None
    return out


def reward_queries(payload, limits: Limits) -> list[str]:
    """POST /get_reward's ``query``: a list of non-empty strings (``prompts`` and ``labels`` are not used)."""
    items = items_list(payload, "query", limits)
    for i, q in enumerate(items):
        if not isinstance(q, str) or not q.strip():
            raise RequestError(422, f"query[{i}] must be a non-empty string, got {_kind(q)}")
    return items


def check_lengths(ids: list[list[int]], limit: int, key: str) -> None:
    """422 naming the first item longer than ``limit`` tokens (the server scores none it was not built for)."""
    for i, x in enumerate(ids):
        if len(x) > limit:
            raise RequestError(422, f"{key}[{i}] is {len(x)} tokens, longer than max_length={limit} (the longest "
                                    "the heads were trained on, or --max-length): shorten it")


# ----------------------------------------------------------------------------------------------
# Dynamic batching: one queue, one model call at a time, each request's rows routed back


ScoreFn = Callable[[list[list[int]]], dict[str, np.ndarray]]


@dataclass
class Job:
    ids: list[list[int]]
    future: asyncio.Future
    tokens: int
    arrived: float


@dataclass
class BatchStats:
    requests: int = 0
    rows: int = 0
    model_calls: int = 0
    rejected_full: int = 0
    largest_call_requests: int = 0


class Batcher:
    """Requests (token id lists) in, each request's outputs out; one model call at a time.

    A call takes the waiting requests in arrival order until their tokens reach ``max_tokens`` (always
    at least one request); when they do not yet, it waits up to ``max_wait_s`` after the first one
    arrived for more to join. ``score_fn`` runs in one worker thread, so the event loop keeps
    answering (health checks, 503s) while the model works. Rows waiting are bounded by ``max_queue``.
    """

    def __init__(self, score_fn: ScoreFn, max_tokens: int, max_wait_s: float, max_queue: int, batching: bool = True):
        self.score_fn, self.max_tokens, self.max_wait_s = score_fn, max_tokens, max_wait_s
        self.max_queue, self.batching = max_queue, batching
        self.jobs: deque[Job] = deque()
        self.queued_rows = 0
        self.stats = BatchStats()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="urm-model")

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Score what is queued, then stop the worker."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, ids: list[list[int]]) -> dict[str, np.ndarray]:
        """Queue one request's rows; its outputs (rows in order) when its batch has run. 503 when full."""
        if self._task is None or self._closing:
            raise RequestError(503, "the server is shutting down")
        if self._task.done():  # the worker died (a bug): say so rather than queue requests nobody will score
            why = "cancelled" if self._task.cancelled() else repr(self._task.exception())
            raise RequestError(500, f"the scoring worker stopped ({why}); restart the server")
        if self.queued_rows + len(ids) > self.max_queue:
            self.stats.rejected_full += 1
            raise RequestError(503, f"the queue is full ({self.queued_rows} conversations waiting, at most "
                                    f"{self.max_queue}): retry shortly")
        loop = asyncio.get_running_loop()
        job = Job(ids, loop.create_future(), sum(map(len, ids)), loop.time())
        self.jobs.append(job)
        self.queued_rows += len(ids)
        self._wake.set()
        return await job.future

    def _take(self) -> list[Job]:
        """The next call's requests: in arrival order while their tokens fit the budget (at least one)."""
        taken, tokens = [self.jobs.popleft()], 0
        tokens = taken[0].tokens
        while self.batching and self.jobs and tokens + self.jobs[0].tokens <= self.max_tokens:
            tokens += self.jobs[0].tokens
            taken.append(self.jobs.popleft())
        return taken

    def _waiting_tokens(self) -> int:
        return sum(j.tokens for j in self.jobs)

    async def _gather(self, loop) -> None:
        """Wait (at most max_wait after the first request arrived) for the budget to fill."""
        deadline = self.jobs[0].arrived + self.max_wait_s
        while not self._closing and self._waiting_tokens() < self.max_tokens:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.jobs:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            if self.batching:
                await self._gather(loop)
            jobs = self._take()
            ids = [x for j in jobs for x in j.ids]
            try:
                out = await loop.run_in_executor(self._executor, self.score_fn, ids)
            except Exception as e:  # the model failed (out of memory, ...): those requests get 500, serving goes on
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
            else:
                start = 0
                for j in jobs:
                    end = start + len(j.ids)
                    if not j.future.done():  # a client that went away cancelled its future
                        j.future.set_result({name: values[start:end] for name, values in out.items()})
                    start = end
            finally:
                self.queued_rows -= len(ids)
                self.stats.requests += len(jobs)
                self.stats.rows += len(ids)
                self.stats.model_calls += 1
                self.stats.largest_call_requests = max(self.stats.largest_call_requests, len(jobs))


# ----------------------------------------------------------------------------------------------
# The service: the loaded model, how to tokenise and score for it, and the app


@dataclass
class Service:
    """A loaded export and how it is served: ``encode`` (conversations or texts -> ids, on one thread),
    ``score_fn`` (ids -> outputs by name, `urm score`'s path), the attribute names and length limit."""

    encode_conversations: Callable[[list], list[list[int]]]
    encode_texts: Callable[[list[str]], list[list[int]]]
    score_fn: ScoreFn
    names: list[str]
    max_length: int
    max_tokens: int
    info: dict = field(default_factory=dict)


def results(out: dict[str, np.ndarray], names: list[str], ids: list[list[int]]) -> list[dict]:
    """/score's rows: `urm score`'s JSON fields per conversation, plus its token count."""
    from pipeline.scoring import row_scores

    return [{**row_scores(out, i, names), "tokens": len(x)} for i, x in enumerate(ids)]


def rewards(out: dict[str, np.ndarray]) -> dict:
    """/get_reward's answer in OpenRLHF's shape; the uncertainty rides along in ``extra_logs``."""
    scores = out["score"].tolist()
    logs = {"score_std": out["score_std"].tolist()}
    if "ensemble_std" in out:
        logs["ensemble_std"] = out["ensemble_std"].tolist()
    return {"rewards": scores, "scores": scores, "extra_logs": logs}


async def read_body(request, limits: Limits) -> bytes:
    """The body, refused (413) as soon as it passes ``max_body_bytes``; 408 if it does not arrive in time."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"bad Content-Length {declared[:20]!r}")
        if int(declared) > limits.max_body_bytes:
            raise RequestError(413, f"the body is {int(declared)} bytes; at most {limits.max_body_bytes} "
                                    "(--max-body-mb)")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(413, f"the body is over {limits.max_body_bytes} bytes (--max-body-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body did not arrive within {limits.body_timeout_s:.0f} s") from None


def create_app(service: Service, limits: Limits, batcher: Batcher | None = None):
    """The FastAPI app: /score, /get_reward (OpenRLHF) and /health, on one ``Batcher``."""
    from contextlib import asynccontextmanager

    batcher = batcher or Batcher(service.score_fn, service.max_tokens, 0.005, limits.max_queue)
    tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="urm-tokenizer")  # one user of the tokenizer
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:  # uvicorn gets here after in-flight requests finished (graceful shutdown)
            await batcher.stop()
            tokenizer_thread.shutdown(wait=True)

    app = FastAPI(title="urm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):  # unknown path, wrong method: the same {"error": ...} shape
        return JSONResponse({"error": f"{e.detail}: {request.method} {request.url.path} (endpoints: POST /score, "
                                      "POST /get_reward, GET /health)"}, status_code=e.status_code)

    def error(status: int, message: str) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def scored(request: Request, parse, encode, key: str):
        """Read, check, tokenise, length-check and score one request: (ids, outputs)."""
        items = parse(parse_json(await read_body(request, limits)), limits)
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(tokenizer_thread, encode, items)
        except Exception as e:  # a chat template that refuses these messages, ...
            raise RequestError(422, f"{key}: cannot be rendered ({type(e).__name__}: {str(e)[:200]})") from None
        check_lengths(ids, service.max_length, key)
        return ids, await batcher.submit(ids)

    async def answer(handler):
        try:
            return JSONResponse(await handler())
        except RequestError as e:
            return error(e.status, e.message)
        except Exception as e:  # never a traceback to the client, and the server goes on
            return error(500, f"internal error: {type(e).__name__}: {str(e)[:200]}")

    @app.post("/score")
    async def score(request: Request):
        async def handle():
            ids, out = await scored(request, score_items, encode_items, "conversations")
            return {"attributes": service.names, "results": results(out, service.names, ids)}

        return await answer(handle)

    def encode_items(items: list) -> list[list[int]]:
        """Message lists rendered by the chat template, texts encoded as they are; in the request's order."""
        ids: list = [None] * len(items)
        convs = [(i, x) for i, x in enumerate(items) if not isinstance(x, str)]
        texts = [(i, x) for i, x in enumerate(items) if isinstance(x, str)]
        for group, encode in ((convs, service.encode_conversations), (texts, service.encode_texts)):
            for (i, _), x in zip(group, encode([x for _, x in group]) if group else []):
                ids[i] = x
        return ids

    @app.post("/get_reward")
    async def get_reward(request: Request):
        async def handle():
            _, out = await scored(request, reward_queries, service.encode_texts, "query")
            return rewards(out)

        return await answer(handle)

    @app.get("/health")
    async def health():
        s = batcher.stats
        return {"status": "ok", "model": service.info, "uptime_s": round(time.time() - started, 1),
                "limits": {"max_items": limits.max_items, "max_queue": limits.max_queue,
                           "max_body_bytes": limits.max_body_bytes, "max_length": service.max_length,
                           "max_tokens_per_batch": service.max_tokens, "max_wait_ms": batcher.max_wait_s * 1000,
                           "dynamic_batching": batcher.batching},
                "stats": {"requests": s.requests, "conversations": s.rows, "model_calls": s.model_calls,
                          "largest_call_requests": s.largest_call_requests, "rejected_full": s.rejected_full,
                          "queued": batcher.queued_rows}}

    return app
