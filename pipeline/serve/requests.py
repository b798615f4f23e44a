"""The server's request checks: a request body read within its limits and parsed into what is to be scored,
or a ``RequestError`` (HTTP status + one message naming what is wrong), never a crash.

  POST /score        {"conversations": [[{role, content}, ...] | "templated text", ...]}
  POST /get_reward   OpenRLHF's remote reward-model protocol: {"query": [str, ...], "prompts": ..., "labels": ...}

Either body may also carry ``"reward"`` (mean, lcb, elcb, min, uwo) and ``"risk"``: the transform for this
request (``reward_choice``), else the server's --reward / --risk. With --api-key set, a request
without ``Authorization: Bearer KEY`` is 401 before its body is read (``check_key``, a constant-time
compare). Too big is 413 (body, items per request), malformed 400 (not UTF-8, not JSON) or 422 (wrong
shape, too long for the heads, a transform the model cannot give), a body that does not arrive in time 408.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass
from typing import Any

from pipeline.data import RowError, check_ends_with_assistant, messages_from
from pipeline.model import RISK_RANGE, RISK_TRANSFORMS, TRANSFORMS, risk_ok
from pipeline.serve.scoring import reward_missing


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


@dataclass(frozen=True)
class RewardChoice:
    """The reward transform a request gets (pipeline.model.rewards) and its risk parameter."""

    transform: str = "mean"
    risk: float = 1.0

    def as_json(self) -> dict:
        """What the answer says it gave: the transform, and its parameter where it has one."""
        return {"reward": self.transform, "risk": self.risk if self.transform in RISK_TRANSFORMS else None}


def reward_choice(payload, default: RewardChoice, members: int, posterior: bool = False) -> RewardChoice:
    """The request's ``reward`` / ``risk`` (each optional: the server's default), 422 when the model cannot
    give it (``members`` value heads; ``posterior``: whether it has a ridge posterior) or the risk is out of range
    (``RISK_RANGE``)."""
    if not isinstance(payload, dict) or ("reward" not in payload and "risk" not in payload):
        return default
    transform, risk = payload.get("reward", default.transform), payload.get("risk", default.risk)
    if transform not in TRANSFORMS:
        raise RequestError(422, f"'reward' must be one of {', '.join(TRANSFORMS)}, got {_kind(transform)}")
    if not risk_ok(risk):
        raise RequestError(422, f"'risk' must be {RISK_RANGE}, got {_kind(risk)}")
    why = reward_missing(transform, members, posterior)
    if why:
        raise RequestError(422, why)
    return RewardChoice(transform, float(risk))


def check_key(authorization: str | None, key: str) -> None:
    """401 unless the Authorization header is ``Bearer KEY``; the key is compared in constant time."""
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode("latin-1", "replace")  # header values arrive latin-1 decoded
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given, key.encode("ascii"))):
        what = "no Authorization header" if authorization is None else "a wrong or malformed Authorization header"
        raise RequestError(401, f"{what}: this server needs 'Authorization: Bearer <key>' (its --api-key)")


def parse_json(body: bytes) -> Any:
    """The request body as JSON (400 when it is not UTF-8, not JSON, or nested too deeply)."""
    if not body.strip():
        raise RequestError(400, "empty request body: send a JSON object")
    try:  # UTF-8 only (RFC 8259), though json.loads would guess UTF-16 / 32 from bytes; a BOM is ignored
        return json.loads(body.decode("utf-8-sig"))
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
