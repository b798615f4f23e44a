"""`urm score`: conversations or pairs through an exported model -> JSONL with uncertainty.

The wiring: read the input (conversations, or pairs in any format pipeline.data.preferences reads),
load the exported model, render every conversation the way the heads were trained on
(pipeline.features.render), score in token-budget batches (pipeline.serve.scoring), write one JSON line per
conversation or pair atomically (or to stdout), and return the throughput for the summary line.

One JSON line per conversation: ``id`` and the heads' outputs (``score``, ``score_std``, and per
attribute ``attribute_means``, ``attribute_stds``, ``gating_weights`` keyed by attribute name; with
an ensemble ``ensemble_scores`` and ``ensemble_std``; with a ridge posterior ``epistemic_std`` and
``attribute_epistemic_stds`` keyed by attribute name; ``base_score`` when the backbone was a reward
model), and ``reward``: the --reward transform of them (pipeline.model.rewards; ``score`` itself under
mean). One line per pair: ``id``, ``subset``, ``chosen`` and ``rejected`` (each as above, without
id), ``p_chosen_bt`` = sigmoid(s_c - s_r) and ``p_chosen_gaussian`` = Phi((s_c - s_r) /
sqrt(var_c + var_r)) (METHOD.md 1), each at the temperature fitted on validation pairs when the heads
were trained (config.json's ``urm.pair_temperature``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.atomic import WRITE_CAUSES, WriteError, write_text
from pipeline.configs import ScoreConfig
from pipeline.outputs import FILE, check_output
from pipeline.model import rewards_of
from pipeline.serve import (ScoreError, check_reward_fits, length_hint, length_limit, nonfinite_field, pair_probabilities,
                            row_scores)


def load_input(source: str, cfg: ScoreConfig):
    """(kind, items, report): conversations, or preference pairs in any format pipeline.data.preferences reads."""
    from pipeline.data import input_kind, load_conversations, load_preferences

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


def output_rows(kind: str, items, out: dict[str, np.ndarray], names: list[str], temperature: dict | None = None,
                reward: str = "mean", risk: float = 1.0):
    """One JSON-ready dict per conversation or pair, in input order (pairs' probabilities at ``temperature``),
    each conversation with its ``reward`` under the transform."""
    given = rewards_of(out, reward, risk).tolist()

    def row(i: int) -> dict:
        return {**row_scores(out, i, names), "reward": given[i]}

    if kind == "conversations":
        for i, conv in enumerate(items):
            yield {"id": conv.id, **row(i)}
        return
    for j, pair in enumerate(items):
        chosen, rejected = row(2 * j), row(2 * j + 1)
        yield {"id": pair.pair_id, "subset": pair.subset, "chosen": chosen, "rejected": rejected,
               **pair_probabilities(chosen, rejected, temperature)}


def within_length(kind: str, items, ids: list[list[int]], limit: int, log, hint: str = "--max-length raises the limit"):
    """Drop (and count) the conversations longer than ``limit`` tokens, a pair with either side whole, as
    extraction does: the heads never saw such lengths (and the backbone may not fit them)."""
    from pipeline.features import keep_mask

    keep = keep_mask(np.array([len(x) for x in ids]), limit, paired=kind == "pairs")
    if keep.all():
        return items, ids, 0
    per_item = keep[0::2] if kind == "pairs" else keep
    dropped = [item for item, k in zip(items, per_item) if not k]
    names = [getattr(item, "pair_id", None) or item.id for item in dropped[:3]]
    if len(dropped) == len(items):
        raise ScoreError(f"all {len(items)} rows are longer than max_length={limit} tokens: nothing to score; {hint}")
    log(f"dropped {len(dropped)} {kind} longer than max_length={limit} tokens (e.g. {', '.join(map(str, names))}); "
        f"{hint}")
    return [i for i, k in zip(items, per_item) if k], [x for x, k in zip(ids, keep) if k], len(dropped)


def write_jsonl(rows, output: str | None) -> int:
    """Write rows to ``output`` atomically, or to stdout when None; returns how many."""
    lines = jsonl_lines(rows)
    if output is None:
        write_stdout(lines)
    else:
        write_text(output, "".join(lines))
    return len(lines)


def write_stdout(lines: list[str]) -> None:
    """``lines`` to stdout; a stdout that cannot take them (a full disk, a closed pipe) is a ``WriteError`` saying
    so, and stdout is pointed at /dev/null so that Python's flush at exit adds no second message."""
    try:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        why = ("its reader closed it before every row was written (a pipe into `head`?)" if e.errno == errno.EPIPE
               else WRITE_CAUSES.get(e.errno, e.strerror or type(e).__name__))
        raise WriteError(f"cannot write the scores to stdout: {why}") from None


def jsonl_lines(rows) -> list[str]:
    """Rows as JSON lines. A non-finite number is refused, naming the row and the field: it is the model's fault on
    that input (a sigma head that overflows there), never a value to pass on."""
    lines = []
    for i, row in enumerate(rows):
        try:
            lines.append(json.dumps(row, allow_nan=False) + "\n")
        except ValueError:
            field, value = nonfinite_field(row)
            raise ScoreError(f"row {i + 1} (id {row.get('id')!r}): {field} is {value}: the model gave a number that is "
                             "not finite for it, so nothing was written. Its heads overflow on this input (a sigma "
                             "fitted on too few rows?): check heads.json's value_head.val, retrain on more rows") from None
    return lines


def earlier_scores(path: Path) -> bool:
    """Whether the file at ``path`` is an earlier `urm score` output: its first line a JSON object with an ``id`` and a
    ``score`` (a conversation) or ``chosen`` (a pair). Anything else there is the user's, replaced only with
    --overwrite (``pipeline.outputs``)."""
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and "id" in first and ("score" in first or "chosen" in first)


def score_file(model_dir: str, source: str, output: str | None, cfg: ScoreConfig, log=None) -> dict:
    """Score every row of ``source`` with the exported model in ``model_dir``; JSONL to ``output``."""
    from tqdm.auto import tqdm

    from pipeline.features import pad_id_of, render_ids
    from pipeline.serve import load_scorer, score_ids

    log = log or (lambda line: print(line, file=sys.stderr))
    if output is not None:  # before anything is read: the one output rule (pipeline.outputs)
        check_output(output, "-o", FILE, inputs=[("--input", source), ("MODEL_DIR", model_dir)],
                     overwrite=cfg.overwrite, own=earlier_scores)
    check_reward_fits(model_dir, cfg.reward)  # a transform the export cannot give stops here, before any read
    kind, items, report = load_input(source, cfg)
    log(report.summary())
    model, tokenizer = load_scorer(model_dir, cfg.dtype, cfg.device, cfg.verify)
    ids = render_ids(tokenizer, flatten(kind, items))
    limit = length_limit(model.config, cfg.max_length)
    items, ids, dropped = within_length(kind, items, ids, limit, log, length_hint(model.config, limit))
    pad_id = pad_id_of(tokenizer)
    counts = {"tokens": 0, "padded_tokens": 0}
    bar = tqdm(total=len(ids), unit="row", desc="score", dynamic_ncols=True, file=sys.stderr)

    def on_batch(n, tokens, padded):
        counts["tokens"] += tokens
        counts["padded_tokens"] += padded
        bar.update(n)

    started = time.perf_counter()
    try:
        out = score_ids(model, ids, cfg.max_tokens_per_batch, pad_id, on_batch)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    from pipeline.model.modeling_urm import pair_temperatures

    names = list(model.config.urm["attributes"])
    rows = output_rows(kind, items, out, names, pair_temperatures(model.config), cfg.reward, cfg.risk)
    if model.config.urm.get("layout") == "published":  # its sigma never calibrated: said on every row
        log(f"{model_dir}: its sigma was never calibrated on held-out data (attribute_stds, score_std and "
            "p_chosen_gaussian are as the checkpoint gives them); rows carry sigma_calibrated: false")
        rows = ({**row, "sigma_calibrated": False} for row in rows)
    written = write_jsonl(rows, output)
    return {"kind": kind, "rows": written, "dropped": dropped, "conversations": len(ids), **counts, "seconds": seconds,
            "rows_per_s": len(ids) / seconds if seconds else 0.0,
            "tokens_per_s": counts["tokens"] / seconds if seconds else 0.0,
            "output": output or "<stdout>"}


def summary(result: dict) -> str:
    """One line for the CLI (on stderr, so stdout stays pure JSONL)."""
    what = "pairs" if result["kind"] == "pairs" else "conversations"
    dropped = f", {result['dropped']} dropped as too long" if result["dropped"] else ""
    return (f"scored {result['rows']} {what} ({result['conversations']} conversations, {result['tokens']} tokens{dropped}) "
            f"in {result['seconds']:.1f} s = {result['rows_per_s']:.1f} rows/s, {result['tokens_per_s']:.0f} tok/s "
            f"-> {result['output']}")
