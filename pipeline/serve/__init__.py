"""Serving: an exported model's scores with uncertainty, for a file (`urm score`) or over HTTP (`urm serve`).

  scoring   an export loaded and checked; its outputs for token ids, as JSON rows; P(chosen better)
  requests  the server's request checks (``RequestError``: status + one message), the API key, a request's reward
  batcher   dynamic batching: one queue, one model call at a time, rows routed back
  app       the FastAPI app: /score, /get_reward (OpenRLHF), /health

Imports the cross-cutting modules, ``pipeline.model``, ``pipeline.features`` (batching), ``pipeline.data``
(message checks) and ``pipeline.export`` (an export's checksums).
"""

from pipeline.serve.app import Access, Service, create_app, results, rewards
from pipeline.serve.batcher import BatchStats, Batcher
from pipeline.serve.requests import (Limits, RequestError, RewardChoice, check_key, check_lengths, parse_json,
                                     read_body, reward_choice, reward_queries, score_items)
from pipeline.serve.scoring import (ScoreError, check_export, check_reward_fits, ensemble_missing, export_config,
                                    length_hint, length_limit, load_scorer, pair_probabilities, row_scores, score_ids)

__all__ = [
    "Access", "BatchStats", "Batcher", "Limits", "RequestError", "RewardChoice", "ScoreError", "Service",
    "check_export", "check_key", "check_lengths", "check_reward_fits", "create_app", "ensemble_missing",
    "export_config", "length_hint", "length_limit", "load_scorer", "pair_probabilities", "parse_json", "read_body",
    "results", "reward_choice", "reward_queries", "rewards", "row_scores", "score_ids", "score_items",
]
