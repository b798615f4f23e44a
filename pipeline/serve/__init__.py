"""Serving: an exported model's scores with uncertainty, for a file (`urm score`) or over HTTP (`urm serve`).

  scoring   an export loaded and checked; its outputs for token ids, as JSON rows; P(chosen better)
  requests  the server's request checks (``RequestError``: status + one message)
  batcher   dynamic batching: one queue, one model call at a time, rows routed back
  app       the FastAPI app: /score, /get_reward (OpenRLHF), /health

Imports the cross-cutting modules, ``pipeline.model``, ``pipeline.features`` (batching), ``pipeline.data``
(message checks) and ``pipeline.export`` (an export's checksums).
"""

from pipeline.serve.app import Service, create_app, results, rewards
from pipeline.serve.batcher import BatchStats, Batcher
from pipeline.serve.requests import (Limits, RequestError, check_lengths, parse_json, read_body, reward_queries,
                                     score_items)
from pipeline.serve.scoring import (ScoreError, check_export, length_hint, length_limit, load_scorer,
                                    pair_probabilities, row_scores, score_ids)

__all__ = [
    "BatchStats", "Batcher", "Limits", "RequestError", "ScoreError", "Service", "check_export", "check_lengths",
    "create_app", "length_hint", "length_limit", "load_scorer", "pair_probabilities", "parse_json", "read_body",
    "results", "reward_queries", "rewards", "row_scores", "score_ids", "score_items",
]
