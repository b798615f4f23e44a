"""Features: the frozen backbone, and conversations -> token ids -> last-token hidden states h.

  backbone     loading the backbone (hub id, directory, GGUF converted once), its config first
  render       chat template -> token ids with exactly one BOS (extraction, scoring, serving alike)
  batching     token-budget batches, right padding, one host copy per batch
  embedding    token ids -> h (and the base reward of a reward-model backbone)
  rows         a dataset's records as cache rows, cut into parts, shared among torchrun ranks
  distributed  torchrun ranks: which rank, its device, the few messages ranks exchange
  vllm_engine  `urm extract --engine vllm`: the same h from vLLM's pooling runner (imports vllm only when used)

Imports the cross-cutting modules and ``pipeline.model`` (where h is read: ``last_token_index``).
"""

from pipeline.features.backbone import (ATTENTION, ENGINES, checkpoint_dir, checkpoint_identity, is_reward_model,
                                        load_backbone, load_weights, open_backbone, weights_fingerprint)
from pipeline.features.batching import OnBatch, pad_id_of, pad_right, plan_batches, run_batches
from pipeline.features.distributed import RankError, Ranks, from_main, gather, rank_device, ranks_from_env
from pipeline.features.embedding import backbone_forward, embed_all
from pipeline.features.render import chat_template_hash, encode_texts, render_ids, render_texts
from pipeline.features.rows import balance_parts, keep_mask, pair_rows, part_bounds, rating_rows

__all__ = [
    "ATTENTION", "backbone_forward", "balance_parts", "chat_template_hash", "checkpoint_dir", "checkpoint_identity",
    "embed_all", "encode_texts", "ENGINES", "from_main", "gather", "is_reward_model", "keep_mask", "load_backbone",
    "load_weights", "OnBatch", "open_backbone", "pad_id_of", "pad_right", "pair_rows", "part_bounds", "plan_batches",
    "rank_device", "RankError", "Ranks", "ranks_from_env", "rating_rows", "render_ids", "render_texts", "run_batches",
    "weights_fingerprint",
]
