"""Batched scoring with uncertainty (`urm score`): conversations or pairs through an exported model -> JSONL.

Rows are rendered by pipeline.render (the rendering the heads were trained on), embedded in
length-sorted batches under a token budget with right padding (pipeline.extract.plan_batches /
pad_right), and every output of the exported model is copied to the host once per batch.

One JSON line per conversation: ``id``, ``score``, ``score_std``, per attribute ``mean``, ``std`` and
gate ``weight`` (dicts keyed by attribute name), plus ``ensemble_scores`` / ``ensemble_std`` for an
ensemble and ``base_score`` when the backbone was a reward model. One line per pair: ``id``,
``subset``, ``chosen`` and ``rejected`` (each as above, without id), and P(chosen > rejected) under
Bradley-Terry, ``p_chosen_bt`` = sigmoid(s_c - s_r), and under the Gaussians, ``p_chosen_gaussian``
= Phi((s_c - s_r) / sqrt(var_c + var_r)) (METHOD.md 1).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ScoreConfig
from pipeline.errors import UserError
from pipeline.extract import pad_right, plan_batches
from pipeline.heads import p_chosen_bt, p_chosen_gaussian

# The model's outputs, in the column order of one batch's host copy.
FIELDS = ("logits", "score_std", "attribute_means", "attribute_stds", "gating_weights",
          "ensemble_scores", "ensemble_std", "base_score")


class ScoreError(UserError):
    """The model directory or the input cannot be scored."""


@dataclass
class ScoreStats:
    rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# The model


def load_scorer(model_dir: str, dtype: str = "auto", device: str = "auto"):
    """An exported model (pipeline's own copy of modeling_urm: no remote code runs) and its tokenizer."""
    from transformers import AutoTokenizer

    from pipeline.backbone import resolve_device, resolve_dtype
    from pipeline.configuration_urm import URMConfig
    from pipeline.modeling_urm import URMForSequenceClassification

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ScoreError(f"{path}: no config.json, so not a model directory; export one with `urm export`")
    config = URMConfig.from_pretrained(path)
    if not getattr(config, "urm", None):
        raise ScoreError(f"{path / 'config.json'}: no 'urm' section, so not a model exported by `urm export`")
    dev = resolve_device(device)
    model = URMForSequenceClassification.from_pretrained(path, config=config, dtype=resolve_dtype(dtype, dev))
    return model.to(dev).eval(), AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def score_batch(model, id_lists: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """The model's outputs for one batch (right-padded), as float32 numpy arrays, one host copy."""
    input_ids, mask = pad_right(id_lists, pad_id)
    out = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device))
    present = [(name, out[name]) for name in FIELDS if out.get(name) is not None]
    columns = [t.float().reshape(len(id_lists), -1) for _, t in present]
    host = torch.cat(columns, dim=1).cpu().numpy()  # the one device -> host copy
    result, start = {}, 0
    for (name, t), col in zip(present, columns):
        result[name] = host[:, start:start + col.shape[1]].reshape((len(id_lists),) + tuple(t.shape[1:]))
        start += col.shape[1]
    return result


def score_ids(model, id_lists: list[list[int]], max_tokens: int, pad_id: int, on_batch=None) -> dict[str, np.ndarray]:
    """Score rows in token-budget batches (longest first); results come back in the input order."""
    lengths = np.array([len(ids) for ids in id_lists])
    out: dict[str, np.ndarray] = {}
    for idx in plan_batches(lengths, max_tokens):
        batch = score_batch(model, [id_lists[i] for i in idx], pad_id)
        for name, values in batch.items():
            if name not in out:
                out[name] = np.empty((len(id_lists),) + values.shape[1:], dtype=np.float32)
            out[name][idx] = values
        if on_batch is not None:
            on_batch(len(idx), int(lengths[idx].sum()), len(idx) * int(lengths[idx].max()))
    return out


# ----------------------------------------------------------------------------------------------
# Output rows


def row_scores(out: dict[str, np.ndarray], i: int, names: list[str]) -> dict:
    """The JSON fields of row ``i``: score, its std, per-attribute mean / std / gate weight, extras."""
    row = {"score": float(out["logits"][i, 0]), "score_std": float(out["score_std"][i]),
           "mean": dict(zip(names, out["attribute_means"][i].tolist())),
           "std": dict(zip(names, out["attribute_stds"][i].tolist())),
           "weight": dict(zip(names, out["gating_weights"][i].tolist()))}
    if "ensemble_scores" in out:
        row["ensemble_scores"] = out["ensemble_scores"][i].tolist()
        row["ensemble_std"] = float(out["ensemble_std"][i])
    if "base_score" in out:
        row["base_score"] = float(out["base_score"][i])
    return row


def pair_probabilities(chosen: dict, rejected: dict) -> dict:
    """P(chosen > rejected) under Bradley-Terry and under the Gaussian scores (METHOD.md 1)."""
    s_c, s_r = torch.tensor(chosen["score"], dtype=torch.float64), torch.tensor(rejected["score"], dtype=torch.float64)
    var_c = torch.tensor(chosen["score_std"], dtype=torch.float64).square()
    var_r = torch.tensor(rejected["score_std"], dtype=torch.float64).square()
    return {"p_chosen_bt": p_chosen_bt(s_c, s_r).item(),
            "p_chosen_gaussian": p_chosen_gaussian(s_c, s_r, var_c, var_r).item()}


# ----------------------------------------------------------------------------------------------
# Inputs


def load_input(source: str, cfg: ScoreConfig):
    """(kind, items, report): conversations, or preference pairs in any format pipeline.preferences reads."""
    from pipeline.conversations import input_kind, load_conversations
    from pipeline.preferences import load_preferences

    kind = "pairs" if cfg.format else input_kind(source)
    if kind == "pairs":
        items, report = load_preferences(source, format=cfg.format, skip_invalid=cfg.skip_invalid, limit=cfg.limit)
    else:
        items, report = load_conversations(source, skip_invalid=cfg.skip_invalid, limit=cfg.limit)
    if not items:
        raise ScoreError(f"{source}: no rows to score ({report.rows_skipped} skipped)")
    return kind, items, report


def flatten(kind: str, items) -> list[list[dict]]:
    """The conversations to embed: one per conversation, or chosen then rejected per pair."""
    if kind == "pairs":
        return [conv for p in items for conv in (p.chosen, p.rejected)]
    return [c.messages for c in items]


def output_rows(kind: str, items, out: dict[str, np.ndarray], names: list[str]):
    """One JSON-ready dict per conversation or pair, in input order."""
    if kind == "conversations":
        for i, conv in enumerate(items):
            yield {"id": conv.id, **row_scores(out, i, names)}
        return
    for j, pair in enumerate(items):
        chosen, rejected = row_scores(out, 2 * j, names), row_scores(out, 2 * j + 1, names)
        yield {"id": pair.pair_id, "subset": pair.subset, "chosen": chosen, "rejected": rejected,
               **pair_probabilities(chosen, rejected)}


def write_jsonl(rows, output: str | None) -> int:
    """Write rows to ``output`` atomically (temp file, then rename), or to stdout when None."""
    lines = [json.dumps(row, allow_nan=False) + "\n" for row in rows]
    if output is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        return len(lines)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(lines)


# ----------------------------------------------------------------------------------------------
# Entry point


def score_file(model_dir: str, source: str, output: str | None, cfg: ScoreConfig, log=None) -> dict:
    """Score every row of ``source`` with the exported model in ``model_dir``; JSONL to ``output``."""
    from tqdm.auto import tqdm

    from pipeline.render import render_ids

    log = log or (lambda line: print(line, file=sys.stderr))
    kind, items, report = load_input(source, cfg)
    log(report.summary())
    model, tokenizer = load_scorer(model_dir, cfg.dtype, cfg.device)
    ids = render_ids(tokenizer, flatten(kind, items))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stats = ScoreStats(rows=len(ids))
    bar = tqdm(total=len(ids), unit="row", desc="score", dynamic_ncols=True, file=sys.stderr)

    def on_batch(n, tokens, padded):
        stats.tokens += tokens
        stats.padded_tokens += padded
        bar.update(n)

    started = time.perf_counter()
    try:
        out = score_ids(model, ids, cfg.max_tokens_per_batch, pad_id, on_batch)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - started
    names = list(model.config.urm["attributes"])
    written = write_jsonl(output_rows(kind, items, out, names), output)
    return {"kind": kind, "rows": written, "conversations": stats.rows, "tokens": stats.tokens,
            "padded_tokens": stats.padded_tokens, "seconds": stats.seconds,
            "rows_per_s": stats.rows / stats.seconds if stats.seconds else 0.0,
            "tokens_per_s": stats.tokens / stats.seconds if stats.seconds else 0.0,
            "output": output or "<stdout>"}


def summary(result: dict) -> str:
    """One line for the CLI (on stderr, so stdout stays pure JSONL)."""
    what = "pairs" if result["kind"] == "pairs" else "conversations"
    return (f"scored {result['rows']} {what} ({result['conversations']} conversations, {result['tokens']} tokens) "
            f"in {result['seconds']:.1f} s = {result['rows_per_s']:.1f} rows/s, {result['tokens_per_s']:.0f} tok/s "
            f"-> {result['output']}")
