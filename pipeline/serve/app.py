"""The HTTP app of `urm serve`: the FastAPI routes over a ``Service`` (a loaded export) and one ``Batcher``.

``create_app(service, limits)`` builds the app that `urm serve` runs under uvicorn:

  POST /score        {"conversations": [[{role, content}, ...] | "templated text", ...], ("reward", "risk")}
                     -> {"attributes": [...], "transform": {reward, risk}, "results": [{score, score_std,
                        attribute_means, attribute_stds, gating_weights, (ensemble_scores, ensemble_std,
                        epistemic_std, attribute_epistemic_stds, base_score), reward, tokens}, ...]}
  POST /get_reward   OpenRLHF's remote reward-model protocol: {"query": [str, ...], "prompts": ..., "labels": ...,
                     ("reward", "risk")}
                     -> {"rewards": [the transform's], "scores": [the plain score], "transform": {reward, risk},
                         "extra_logs": {"score_std": [...], ("ensemble_std", "epistemic_std": [...]),
                                        "transform_<name>": [1.0, ...], ("risk": [...])}}
  GET  /health       {"status": "ok", "model": {...}, "limits": {...}, "stats": {...}}

The reward transform (pipeline.model.rewards: mean, lcb, elcb, min, uwo) is the server's --reward / --risk
unless the request names its own. OpenRLHF turns every ``extra_logs`` value into a tensor
(openrlhf/trainer/ppo_utils/samples_generator.py, ``torch.tensor([value])``), so the transform rides
there as numbers: a 1.0 per row under ``transform_<name>`` and its parameter under ``risk``; the
top-level ``transform`` says the same for other clients. With --api-key every request needs
``Authorization: Bearer KEY`` (401 before its body is read; /health too unless --open-health).

OpenRLHF's protocol, as read in OpenRLHF/OpenRLHF at 3c3be62 (2026-08-13): the trainer
(openrlhf/utils/agent.py, ``SingleTurnAgentExecutor._fetch_rewards_via_http``) POSTs
``{"query": [...], "prompts": [...], "labels": [...]}`` per sample (the query is prompt + response
decoded with ``skip_special_tokens=False``: chat-templated text) to ``--reward.remote_url``, with a
180 s timeout and 5 tries, and reads ``rewards``, ``scores`` (else ``rewards``) and ``extra_logs``
from the JSON answer; its own server (openrlhf/cli/serve_rm.py, ``POST /get_reward``) answers
``{"rewards": r, "scores": r, "extra_logs": {...}}``. ``prompts`` and ``labels`` are accepted and
not used here (a reward model scores the query alone).

Every conversation goes through the code `urm score` runs: ``pipeline.features.render`` for the token ids
(templated strings by ``encode_texts``, the same rule), ``pipeline.serve.scoring.score_ids`` for the
token-budget batches and ``row_scores`` for the JSON, so the numbers are `urm score`'s. The
``Batcher`` gathers the requests that arrive within ``max_wait`` of the first (until their tokens
fill the budget), runs one model call at a time in its own thread, and hands each request back its
own rows. Request bodies, items per request and queued rows are bounded: too big is 413, a full
queue 503, anything malformed 400 or 422, each with ``{"error": "..."}`` naming what is wrong.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.model import RISK_TRANSFORMS, SUBTRACTS, rewards_of
from pipeline.serve.batcher import Batcher, ScoreFn
from pipeline.serve.requests import (Limits, RequestError, RewardChoice, check_key, check_lengths, parse_json,
                                     read_body, reward_choice, reward_queries, score_items)
from pipeline.serve.scoring import nonfinite_field, row_scores

MEAN = RewardChoice()


UNCERTAINTY = {"aleatoric": ["score_std", "attribute_stds"],
               "epistemic": ["ensemble_std", "ensemble_scores", "epistemic_std", "attribute_epistemic_stds"],
               "about": "aleatoric: the noise of the ratings (sigma, calibrated on held-out rows); epistemic: how much the "
                        "ensemble members, fitted on resamples of the training rows, disagree, and the ridge "
                        "posterior's std (closed form); both grow off the data",
               "rewards": dict(SUBTRACTS)}


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
    members: int = 1
    posterior: bool = False  # the heads carry a ridge posterior (epistemic_std, --reward elcb)


@dataclass(frozen=True)
class Access:
    """Who may call: with ``api_key`` every request needs ``Authorization: Bearer KEY``; ``open_health``
    leaves GET /health open without it."""

    api_key: str | None = field(default=None, repr=False)  # never shown
    open_health: bool = False


def results(out: dict[str, np.ndarray], names: list[str], ids: list[list[int]], choice: RewardChoice = MEAN) -> list[dict]:
    """/score's rows: `urm score`'s JSON fields per conversation (``reward`` included), plus its token count."""
    given = rewards_of(out, choice.transform, choice.risk).tolist()
    return [{**row_scores(out, i, names), "reward": given[i], "tokens": len(x)} for i, x in enumerate(ids)]


def rewards(out: dict[str, np.ndarray], choice: RewardChoice = MEAN) -> dict:
    """/get_reward's answer in OpenRLHF's shape: ``rewards`` the transform's, ``scores`` the plain score; the
    uncertainty and the transform ride along in ``extra_logs`` (numbers only: OpenRLHF makes tensors of them)."""
    scores = out["score"].tolist()
    n = len(scores)
    logs = {"score_std": out["score_std"].tolist()}
    for name in ("ensemble_std", "epistemic_std"):
        if name in out:
            logs[name] = out[name].tolist()
    logs[f"transform_{choice.transform}"] = [1.0] * n
    if choice.transform in RISK_TRANSFORMS:
        logs["risk"] = [choice.risk] * n
    return {"rewards": rewards_of(out, choice.transform, choice.risk).tolist(), "scores": scores,
            "transform": choice.as_json(), "extra_logs": logs}


def create_app(service: Service, limits: Limits, batcher: Batcher | None = None, reward: RewardChoice = MEAN,
               access: Access = Access()):
    """The FastAPI app: /score, /get_reward (OpenRLHF) and /health, on one ``Batcher``; ``reward`` is the
    transform a request gets unless it asks for another, ``access`` who may call."""
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
        headers = {"Retry-After": "1"} if status == 503 else {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def scored(request: Request, parse, encode, key: str):
        """Read, check, tokenise, length-check and score one request: (ids, outputs, its reward transform)."""
        payload = parse_json(await read_body(request, limits))
        items, choice = parse(payload, limits), reward_choice(payload, reward, service.members, service.posterior)
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(tokenizer_thread, encode, items)
        except Exception as e:  # a chat template that refuses these messages, ...
            raise RequestError(422, f"{key}: cannot be rendered ({type(e).__name__}: {str(e)[:200]})") from None
        check_lengths(ids, service.max_length, key)
        return ids, await batcher.submit(ids), choice

    async def answer(request: Request, handler, open_route: bool = False):
        try:
            if access.api_key is not None and not open_route:  # before the body is read: nothing scored
                check_key(request.headers.get("authorization"), access.api_key)
            body = await handler()
            field, value = nonfinite_field(body)
            if field is not None:  # JSON has no NaN: say which number, not that the encoder failed
                return error(500, f"the model gave {value} for {field}: its heads overflow on this input (a sigma "
                                  "fitted on too few rows?); nothing was sent for this request")
            return JSONResponse(body)
        except RequestError as e:
            return error(e.status, e.message)
        except Exception as e:  # never a traceback to the client, and the server goes on
            return error(500, f"internal error: {type(e).__name__}: {str(e)[:200]}")

    @app.post("/score")
    async def score(request: Request):
        async def handle():
            ids, out, choice = await scored(request, score_items, encode_items, "conversations")
            return {"attributes": service.names, "uncertainty": UNCERTAINTY, "transform": choice.as_json(),
                    "results": results(out, service.names, ids, choice)}

        return await answer(request, handle)

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
            _, out, choice = await scored(request, reward_queries, service.encode_texts, "query")
            return rewards(out, choice)

        return await answer(request, handle)

    @app.get("/health")
    async def health(request: Request):
        return await answer(request, health_body, open_route=access.open_health)

    async def health_body():
        s = batcher.stats
        return {"status": "ok", "model": service.info, "uptime_s": round(time.time() - started, 1),
                "limits": {"max_items": limits.max_items, "max_queue": limits.max_queue,
                           "max_body_bytes": limits.max_body_bytes, "max_length": service.max_length,
                           "max_tokens_per_batch": service.max_tokens, "max_wait_ms": batcher.max_wait_s * 1000,
                           "dynamic_batching": batcher.batching},
                "reward": reward.as_json(), "api_key": access.api_key is not None,
                "stats": {"requests": s.requests, "conversations": s.rows, "model_calls": s.model_calls,
                          "largest_call_requests": s.largest_call_requests, "rejected_full": s.rejected_full,
                          "queued": batcher.queued_rows}}

    return app
