"""The backbone's forward pass: token ids -> last-token hidden states h, and the base reward.

h is the final layer's hidden state (after the final norm) at the last position the attention mask
attends (docs/method.md 1, 5): ``use_cache=False``, the base model only (no ``output_hidden_states``).
When the backbone is itself a reward model, its own head's score on the same h comes along
(``base_score``). Rows are batched by ``pipeline.features.batching``.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.features.batching import OnBatch, pad_id_of, run_batches
from pipeline.model import last_token_index


def backbone_forward(backbone, input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """One padded batch: {"embedding": h [B, d]} plus {"base_score": [B]} for a reward-model backbone."""
    input_ids, mask = input_ids.to(backbone.device), mask.to(backbone.device)
    hidden = backbone.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    h = hidden[torch.arange(len(input_ids), device=hidden.device), last_token_index(mask)]
    out = {"embedding": h}
    if backbone.score_head is not None:
        out["base_score"] = backbone.score_head(h)[:, 0]
    return out


def embed_all(backbone, id_lists: list[list[int]], max_tokens: int,
              on_batch: OnBatch | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """h [N, d] float32 for every row (input order), and the base score [N] (None without one)."""
    if not id_lists:
        empty = np.empty((0, backbone.hidden_size), dtype=np.float32)
        return empty, (np.empty(0, dtype=np.float32) if backbone.score_head is not None else None)
    out = run_batches(lambda ids, mask: backbone_forward(backbone, ids, mask), id_lists, max_tokens,
                      pad_id_of(backbone.tokenizer), on_batch)
    return out["embedding"], out.get("base_score")
