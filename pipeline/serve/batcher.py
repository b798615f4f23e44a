"""Dynamic batching: one queue, one model call at a time, each request's rows routed back to it.

The ``Batcher`` gathers the requests that arrive within ``max_wait`` of the first (until their
tokens fill the budget), runs one model call at a time in its own thread, and hands each request
back its own rows. Rows waiting are bounded: a request that would exceed the queue gets 503.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.serve.requests import RequestError

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
