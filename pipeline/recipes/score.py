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
sqrt(var_c + var_r)) (docs/method.md 1), each at the temperature fitted on validation pairs when the heads
were trained (config.json's ``urm.pair_temperature``).
"""

from __future__ import annotations

import logging
import sys
import time

from pipeline import progress_shown
from pipeline.configs import ScoreConfig
from pipeline.outputs import FILE, check_output
from pipeline.serve import (check_reward_fits, earlier_scores, flatten, length_hint, length_limit, load_input,
                            output_rows, within_length, write_jsonl)

logger = logging.getLogger(__name__)


def score_file(model_dir: str, cfg: ScoreConfig) -> dict:
    """Score every row of ``cfg.input`` with the exported model in ``model_dir``; JSONL to ``cfg.output`` (stdout
    when None)."""
    from tqdm.auto import tqdm

    from pipeline.features import pad_id_of, render_ids
    from pipeline.serve import load_scorer, score_ids

    source, output = cfg.input, cfg.output
    if output is not None:  # before anything is read: the one output rule (pipeline.outputs)
        check_output(output, "-o", FILE, inputs=[("--input", source), ("MODEL_DIR", model_dir)],
                     overwrite=cfg.overwrite, own=earlier_scores)
    check_reward_fits(model_dir, cfg.reward)  # a transform the export cannot give stops here, before any read
    kind, items, report = load_input(source, cfg.reading)
    logger.info(report.summary())
    model, tokenizer = load_scorer(model_dir, cfg.runtime.dtype, cfg.runtime.device, cfg.runtime.verify)
    ids = render_ids(tokenizer, flatten(kind, items))
    limit = length_limit(model.config, cfg.reading.max_length)
    items, ids, dropped = within_length(kind, items, ids, limit, length_hint(model.config, limit))
    pad_id = pad_id_of(tokenizer)
    counts = {"tokens": 0, "padded_tokens": 0}
    bar = tqdm(total=len(ids), unit="row", desc="score", dynamic_ncols=True, file=sys.stderr,
               disable=not progress_shown())

    def on_batch(n, tokens, padded):
        counts["tokens"] += tokens
        counts["padded_tokens"] += padded
        bar.update(n)

    started = time.perf_counter()
    try:
        out = score_ids(model, ids, cfg.runtime.max_tokens_per_batch, pad_id, on_batch)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    from pipeline.model.modeling_urm import pair_temperatures

    names = list(model.config.urm["attributes"])
    rows = output_rows(kind, items, out, names, pair_temperatures(model.config), cfg.reward, cfg.risk)
    if model.config.urm.get("layout") == "published":  # its sigma never calibrated: said on every row
        logger.warning(f"{model_dir}: its sigma was never calibrated on held-out data (attribute_stds, score_std and "
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
