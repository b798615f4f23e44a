"""Serving: an exported model's scores with uncertainty, for a file (`urm score`) or over HTTP (`urm serve`).

  scoring   an export loaded and checked; its outputs for token ids, as JSON rows; P(chosen better)
  score_files  a file to score (`urm score`, `urm curate`): its rows read, the length rule, JSON lines written
  requests  the server's request checks (``RequestError``: status + one message), the API key, a request's reward
  batcher   dynamic batching: one queue, one model call at a time, rows routed back
  app       the FastAPI app: /score, /get_reward (OpenRLHF), /health
  service   an export loaded once as the app's ``Service`` (`urm score`'s tokenising and scoring)
  listening the server's socket, bound before the model loads (``ServeError`` when it cannot be)
  engine_answer  the whole answer as one vector per response (vLLM's /pooling): its layout, made, read back
  vllm_plugin    the vLLM plugin (entry point ``vllm.general_plugins``): registers the export's architectures
  vllm_model     the export as a vLLM pooling model (imported by vLLM only: it imports vllm; nothing here does)

Imports the cross-cutting modules, ``pipeline.model``, ``pipeline.features`` (batching), ``pipeline.data``
(message checks) and ``pipeline.export`` (an export's checksums).

A config is the caller's: a function here takes the one a recipe hands it (``ServeConfig`` from
``pipeline.configs``, for ``load_service``) and reads its fields. This stage never imports ``pipeline.configs``, not
even for types: the configs import the stages' lists of allowed values, and that way alone (tests/test_layout.py).
"""

from pipeline.serve.app import Access, create_app, results, rewards
from pipeline.serve.batcher import Batcher
from pipeline.serve.engine_answer import answer_layout, answer_vectors, read_answer
from pipeline.serve.listening import ServeError, bind, is_loopback
from pipeline.serve.requests import (Limits, RequestError, RewardChoice, check_key, check_lengths, parse_json,
                                     reward_choice, reward_queries, score_items)
from pipeline.serve.score_files import (earlier_scores, flatten, jsonl_lines, load_input, output_rows, within_length,
                                        write_jsonl)
from pipeline.serve.service import load_service
from pipeline.serve.scoring import (ScoreError, check_export, check_reward_fits, export_config, length_hint,
                                    length_limit, load_scorer, nonfinite_field, pair_probabilities, row_scores,
                                    score_ids)

__all__ = [
    "Access", "answer_layout", "answer_vectors", "Batcher", "bind", "check_export", "check_key", "check_lengths",
    "check_reward_fits", "create_app", "earlier_scores", "export_config", "flatten", "is_loopback", "jsonl_lines",
    "length_hint", "length_limit", "Limits", "load_input", "load_scorer", "load_service", "nonfinite_field",
    "output_rows", "pair_probabilities", "parse_json", "read_answer", "RequestError", "results", "reward_choice",
    "reward_queries", "RewardChoice", "rewards", "row_scores", "score_ids", "score_items", "ScoreError", "ServeError",
    "within_length", "write_jsonl",
]
