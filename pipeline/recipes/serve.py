"""`urm serve`: an exported model behind HTTP for RLHF loops (pipeline.serve), under uvicorn.

The wiring: check the options and the export, load it once (GPU when there is one: --device auto),
bind the address (a port in use is one clear error; port 0 picks a free one), print the address,
then serve until SIGTERM or Ctrl-C, which stop taking connections, let the requests in flight
finish, and return. Scores come from `urm score`'s own path (pipeline.features.render, pipeline.serve.scoring).
"""

from __future__ import annotations

import logging
import signal
import sys
import time

from pipeline.configs import ServeConfig
from pipeline.serve import ServeError, bind, is_loopback, load_service

logger = logging.getLogger(__name__)


def run_serve(model_dir: str, cfg: ServeConfig) -> dict:
    """Serve ``model_dir`` on cfg.host:cfg.port until SIGTERM / Ctrl-C; returns what was served."""
    import uvicorn

    from pipeline.serve import Access, Batcher, Limits, RewardChoice, check_reward_fits, create_app

    if cfg.open_health and cfg.api_key is None:
        raise ServeError("--open-health leaves GET /health open to callers without the key, but no key is set "
                         "(--api-key or URM_API_KEY), so every route is open: set a key, or drop --open-health")
    sock = bind(cfg.host, cfg.port)  # before loading: a taken port fails in a second, not after the model loads
    try:
        check_reward_fits(model_dir, cfg.reward)  # and a --reward the export cannot give, before it loads
        service = load_service(model_dir, cfg)
        limits = Limits(max_items=cfg.max_items, max_queue=cfg.max_queue,
                        max_body_bytes=int(cfg.max_body_mb * (1 << 20)))
        batcher = Batcher(service.score_fn, cfg.runtime.max_tokens_per_batch, cfg.max_wait_ms / 1000, cfg.max_queue,
                          batching=cfg.dynamic_batching)
        app = create_app(service, limits, batcher, RewardChoice(cfg.reward, float(cfg.risk)),
                         Access(cfg.api_key, cfg.open_health))
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        if not is_loopback(cfg.host) and cfg.api_key is None:
            logger.warning(f"warning: listening on {cfg.host}, not loopback: the server has no authentication; anyone "
                           "who can reach this address can use the model (--api-key or URM_API_KEY requires a key)")
        # The address line is the command's output, not a log line: stdout, flushed, so scripts (and the tests) can
        # wait for it, --quiet or not.
        keyed = ("; API key required" + ("" if cfg.open_health else ", /health too")) if cfg.api_key else ""
        sys.stdout.write(f"urm serve: listening on http://{shown}:{port} ({service.info['device']}, "
                         f"{service.info['dtype']}; POST /score, POST /get_reward, GET /health; reward "
                         f"{cfg.reward}{keyed})\n")
        sys.stdout.flush()
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=60,
                                limit_concurrency=max(64, 2 * cfg.max_queue), timeout_keep_alive=30)
        server = uvicorn.Server(config)
        started = time.time()
        # uvicorn catches SIGTERM / SIGINT itself (stop accepting, let in-flight requests finish), then raises
        # the signal again under the handler that was there before: a quiet one, so a requested stop returns.
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        sock.close()
    stats = batcher.stats
    return {"address": f"http://{shown}:{port}", "seconds": time.time() - started, "requests": stats.requests,
            "conversations": stats.rows, "model_calls": stats.model_calls}


def summary(result: dict) -> str:
    return (f"urm serve: stopped after {result['seconds']:.0f} s; served {result['requests']} requests "
            f"({result['conversations']} conversations) in {result['model_calls']} model calls")
