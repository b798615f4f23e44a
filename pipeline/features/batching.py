"""Token-budget batching: length-sorted batches, right padding, one device-to-host copy per batch.

Extraction (the backbone's hidden states) and scoring (an exported model's outputs) both run token
id lists through a model this way (docs/method.md 5): ``run_batches`` plans the batches, pads each,
calls the model, copies its outputs to the host once and puts them back in the input order.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

# forward(input_ids [B, L], attention_mask [B, L]) -> {name: tensor [B, ...]}, on any device
Forward = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
# on_batch(rows, real tokens, tokens processed including padding)
OnBatch = Callable[[int, int, int], None]
# No row of a batch is padded by more than this share of the batch's longest row: rows of mixed lengths
# (a server's few requests, the tail of a dataset) go into several batches rather than one mostly padding.
MAX_ROW_PADDING = 0.25


def plan_batches(lengths: np.ndarray, max_tokens: int, max_row_padding: float = MAX_ROW_PADDING) -> list[np.ndarray]:
    """Indices of each batch: longest rows first, each batch's rows x longest row <= max_tokens, and
    every row at least (1 - max_row_padding) x the batch's longest.

    Sorting by length keeps padding small; the longest batch comes first so an out-of-memory
    error shows at once. A row longer than the budget gets a batch of its own.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        n = max(1, max_tokens // longest)
        short = np.flatnonzero(lengths[order[start : start + n]] < (1 - max_row_padding) * longest)
        n = int(short[0]) if len(short) else n
        batches.append(order[start : start + n])
        start += n
    return batches


def pad_id_of(tokenizer) -> int:
    """The id right padding writes: the tokenizer's pad token, else 0 (the attention mask hides it either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_right(id_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask ([B, L] int64)."""
    longest = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), longest), dtype=torch.long)
    for i, ids in enumerate(id_lists):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return input_ids, mask


def to_host(outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every output as a float32 numpy array, in one device -> host copy (one concatenated tensor)."""
    rows = next(iter(outputs.values())).shape[0]
    columns = [t.float().reshape(rows, -1) for t in outputs.values()]
    host = torch.cat(columns, dim=1).cpu().numpy()
    result, start = {}, 0
    for (name, t), col in zip(outputs.items(), columns):
        result[name] = host[:, start:start + col.shape[1]].reshape((rows,) + tuple(t.shape[1:]))
        start += col.shape[1]
    return result


@torch.inference_mode()
def run_batches(forward: Forward, id_lists: list[list[int]], max_tokens: int, pad_id: int,
                on_batch: OnBatch | None = None) -> dict[str, np.ndarray]:
    """Run every row through ``forward`` in token-budget batches; outputs come back in the input order."""
    lengths = np.array([len(ids) for ids in id_lists])
    out: dict[str, np.ndarray] = {}
    for idx in plan_batches(lengths, max_tokens):
        batch = to_host(forward(*pad_right([id_lists[i] for i in idx], pad_id)))
        for name, values in batch.items():
            if name not in out:
                out[name] = np.empty((len(id_lists),) + values.shape[1:], dtype=np.float32)
            out[name][idx] = values
        if on_batch is not None:
            on_batch(len(idx), int(lengths[idx].sum()), len(idx) * int(lengths[idx].max()))
    return out
