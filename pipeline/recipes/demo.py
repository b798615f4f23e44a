"""`urm demo`: the whole job on a preset (by default the offline `demo`), then what it produced.

The wiring: extract (complete caches are kept, so a rerun skips the backbone) -> train-heads ->
export (replacing the preset's previous export) -> evaluate, each step the same recipe its own
command runs; then the export scores the sigmoid example of the peers' model cards (answer 2 is
the right one) and the run ends with both scores and their uncertainty, P(answer 2 better), the
evaluation's tables and where every artifact is. The verdict on the example is read off the
numbers, whichever way they come out.
"""

from __future__ import annotations

import logging
import time

from pipeline import configs as C

logger = logging.getLogger(__name__)

STEPS = ("extract", "train-heads", "export", "evaluate", "score the sigmoid example")
# Within this band P(answer 2 better) says the model cannot tell the two answers apart.
UNDECIDED = (0.4, 0.6)


def load_configs(preset: str) -> dict:
    """Every stage's config from the preset (checked before anything loads); the export replaces the
    preset's previous one, since the heads it was made from are trained again."""
    configs = {stage: C.load_config(stage, preset) for stage in C.STAGES}
    configs["export"].overwrite = True
    return configs


def step(i: int) -> float:
    logger.info(f"\n== [{i + 1}/{len(STEPS)}] {STEPS[i]} ==")
    return time.perf_counter()


def run_demo(preset: str = C.DEFAULT_PRESET) -> dict:
    """Run extract -> train-heads -> export -> evaluate on ``preset`` and score the sigmoid example."""
    from pipeline.recipes.evaluate import run_evaluate
    from pipeline.recipes.export import export_model
    from pipeline.recipes.export import summary as export_summary
    from pipeline.recipes.extract import run_extract
    from pipeline.recipes.train import holding_heads, train_heads

    configs = load_configs(preset)
    started, seconds = time.perf_counter(), {}
    with holding_heads(configs["value_head"], configs["gating"]):  # one writer per heads folder, before any load
        t = step(0)
        extracted = run_extract(configs["extract"])
        seconds["extract"] = time.perf_counter() - t
        t = step(1)
        trained = train_heads(configs["value_head"], configs["gating"])
        seconds["train-heads"] = time.perf_counter() - t
        t = step(2)
        exported = export_model(configs["export"])
        logger.info(export_summary(exported))
        seconds["export"] = time.perf_counter() - t
        t = step(3)
        report = run_evaluate(configs["evaluate"])
        seconds["evaluate"] = time.perf_counter() - t
    t = step(4)
    example = score_sigmoid_example(exported["out_dir"], configs["score"])
    seconds["score"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    result = {"preset": preset, "extracted": extracted, "trained": trained, "export": exported["out_dir"],
              "report": report, "example": example, "seconds": seconds,
              "paths": {"cache": configs["extract"].cache_dir, "heads": configs["value_head"].run.heads_dir,
                        "export": exported["out_dir"], "report": report["files"]["md"]}}
    return result


def score_sigmoid_example(model_dir: str, cfg: C.ScoreConfig) -> dict:
    """Both answers of the sigmoid example through the export: their outputs and P(answer 2 better)."""
    from pipeline.export import SIGMOID_ANSWERS, SIGMOID_PROMPT, sigmoid_example
    from pipeline.features import pad_id_of, render_ids
    from pipeline.model.modeling_urm import pair_temperatures
    from pipeline.serve import load_scorer, pair_probabilities, row_scores, score_ids

    run = cfg.runtime
    model, tokenizer = load_scorer(model_dir, run.dtype, run.device, run.verify)
    ids = render_ids(tokenizer, sigmoid_example())
    out = score_ids(model, ids, run.max_tokens_per_batch, pad_id_of(tokenizer))
    names = list(model.config.urm["attributes"])
    answers = [row_scores(out, i, names) for i in range(2)]
    p = pair_probabilities(answers[1], answers[0], pair_temperatures(model.config))
    return {"prompt": SIGMOID_PROMPT, "texts": list(SIGMOID_ANSWERS), "answers": answers,
            "p_answer2_bt": p["p_chosen_bt"], "p_answer2_gaussian": p["p_chosen_gaussian"],
            "dtype": str(model.dtype).removeprefix("torch.")}


def verdict(p: float) -> str:
    """What P(answer 2 better) says, in words (answer 2, "between 0 and 1", is the right one)."""
    if p > UNDECIDED[1]:
        return "it prefers answer 2, the right one"
    if p < UNDECIDED[0]:
        return "it prefers answer 1, the wrong one"
    return "it cannot tell them apart"


def example_lines(example: dict) -> list[str]:
    """The sigmoid example as a person reads it: scores with their std, the attributes, P(answer 2 better)."""
    a1, a2 = example["answers"]
    lines = [f"prompt: {example['prompt']}"]
    for i, (text, a) in enumerate(zip(example["texts"], example["answers"])):
        lines.append(f"  answer {i + 1}: {text!r}\n    score {a['score']:+.3f} +- {a['score_std']:.3f} (std)")
    names = list(a1["attribute_means"])
    width = max(len(n) for n in names)
    lines.append(f"  {'attribute':<{width}}  {'answer 1 mean +- std':>22}  {'answer 2 mean +- std':>22}  gate weight")
    for n in names:
        cells = [f"{a['attribute_means'][n]:.2f} +- {a['attribute_stds'][n]:.2f}" for a in (a1, a2)]
        lines.append(f"  {n:<{width}}  {cells[0]:>22}  {cells[1]:>22}  {a2['gating_weights'][n]:.2f}")
    p_g, p_bt = example["p_answer2_gaussian"], example["p_answer2_bt"]
    lines.append(f"P(answer 2 better) = {p_g:.3f} under the Gaussians, {p_bt:.3f} under Bradley-Terry: "
                 f"{verdict(p_g)}.")
    return lines


def summary(result: dict) -> str:
    """The closing block: the example, the evaluation's tables, where everything is, the time taken."""
    from pipeline.recipes.evaluate import summary as evaluation_summary

    paths, seconds = result["paths"], result["seconds"]
    lines = ["", "=" * 100, "The sigmoid example, scored by the export "
             f"({paths['export']}, {result['example']['dtype']}):", *example_lines(result["example"]), "",
             "Evaluation on held-out data (accuracy, calibration, uncertainty; the baselines are fitted on the "
             "same training caches):", evaluation_summary(result["report"]), "",
             "Where things are:",
             f"  feature cache  {paths['cache']}/  ({', '.join(result['extracted'])})",
             f"  heads          {paths['heads']}/",
             f"  export         {paths['export']}/  (AutoModelForSequenceClassification, trust_remote_code=True)",
             f"  report         {paths['report']}  (report.json and the plots beside it)",
             "  next           urm score " + paths["export"] + " -i FILE.jsonl;  notebooks/explore_cache.ipynb", "",
             "Done in " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
             + f": {seconds['total']:.0f} s in all. The data is synthetic: this shows the pipeline working, "
             "not reward quality."]
    return "\n".join(lines)
