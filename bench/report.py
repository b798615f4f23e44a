"""`python -m bench report`: docs/benchmarks.md, written from the committed results in bench/results/*.json.

Every number on that page comes from a result file: nothing is copied by hand, and tests/test_bench_report.py
checks that the committed page is what this command writes. One section per result file, in file-name order:
what the benchmark measures (the first paragraph of its module docstring, and the result's own ``what``), the
command that reruns it, the machine and its load when it ran, and its key numbers in tables. The result files
this module knows get their own tables (``LAYOUTS``); any other result file (a new benchmark, or a known one
whose layout changed) gets a generic table of its numbers, so a new result never breaks the page. The output
depends only on the files' contents (no clock, no machine): run it anywhere, get the same bytes.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from pathlib import Path
from typing import Callable

from bench import RESULTS

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
# Result files that another benchmark writes, or that need options to be remade: file stem -> (module, command)
WRITTEN_BY = {
    "serve_load_export": ("serve_load", "python -m bench serve_load --model runs/demo/model", "after `make demo`"),
    "serve_load_rewards": ("serve_load", "python -m bench serve_load --rewards", None),
    "extract_engines": ("extract_engines", ".venv-vllm/bin/python -m bench extract_engines",
                        "vLLM's venv: `make test-vllm` builds it"),
    "gpu": ("gpu", "python -m bench gpu", "needs a CUDA GPU; `make bench-gpu`"),
    "overopt_quick": ("overopt", "python -m bench overopt --quick", None),
}
SKIPPED_KEYS = {"machine", "what", "load_average_before", "load_average_after", "closing_output", "logs", "runs",
                "flops_model", "all_seconds"}

Table = tuple[str, list[str], list[list]]  # (caption, header, rows)


# ----------------------------------------------------------------------------------------------
# Formatting


def fmt(x) -> str:
    """A number as the page shows it: 3 significant digits below 100, one decimal to 1000, whole numbers with
    thousands separators above; yes/no for booleans; a dash for None.

    >>> [fmt(v) for v in (0.0123456, 1.23456, 123.456, 151009.97, 7, True, None, "a|b")]
    ['0.0123', '1.23', '123.5', '151,010', '7', 'yes', '-', 'a\\\\|b']
    """
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        if x.is_integer() and abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.1f}"
        return f"{x:.3g}"
    if isinstance(x, dict) and set(x) >= {"mean", "sd"}:  # a statistic over seeds
        return f"{fmt(x['mean'])} ± {fmt(x['sd'])}"
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v) for v in x)
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


def number_leaves(data, prefix: str = "", depth: int = 3) -> list[tuple[str, object]]:
    """(dotted key, value) of every number or boolean in ``data`` down to ``depth`` levels of dicts (lists and the
    keys in SKIPPED_KEYS left out): the generic table of a result file this module does not know."""
    out = []
    for key, value in data.items():
        if key in SKIPPED_KEYS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, bool):
            out.append((name, value))
        elif isinstance(value, dict) and set(value) >= {"mean", "sd"}:
            out.append((name, value))
        elif isinstance(value, dict) and depth > 1:
            out += number_leaves(value, name + ".", depth - 1)
    return out


# ----------------------------------------------------------------------------------------------
# The known result files


def cache_read(r: dict) -> list[Table]:
    rows = [[name, r[f"{key}_seconds"], r[f"{key}_gbps"]] for name, key in (
        ("read_features, checksums verified", "read"), ("read_features, not verified", "read_unverified"),
        ("numpy copyto (reference)", "numpy_copyto"), ("numpy copy (reference)", "numpy_copy"),
        ("pyarrow read_table", "pyarrow_read_table"), ("xxh3-128 of the part files", "xxh3_128"),
        ("sha256 of the part files", "sha256"), ("writing the cache", "write"))]
    return [(f"{r['rows']:,} rows x {r['dim']} {r['dtype']} ({r['bytes'] / 1e9:.2f} GB, {r['parts']} parts)",
             ["what", "seconds", "GB/s"], rows),
            ("", ["ratio / target", "value"], [["verification cost (verified / not)", r["verify_cost_ratio"]],
                                               ["read time / numpy copy", r["ratio_vs_copy"]],
                                               ["read time / numpy copyto", r["ratio_vs_copyto"]],
                                               *[["target: " + k.removeprefix("target_").replace("_", " "), v]
                                                 for k, v in r.items() if k.startswith("target_")]])]


def _curate_section(r: dict, title: str) -> list[Table]:
    flips = r["flip_detection_auroc"]
    training = r["training"]
    return [
        (f"{title}: AUROC with which each signal ranks the flipped training pairs first (mean ± sd over seeds)",
         ["signal", "AUROC"], [[k, v] for k, v in flips.items()]),
        (f"{title}: held-out accuracy after training on each set of pairs (mean ± sd over seeds)",
         ["training pairs", "pairs", "flipped kept", "gate (--gate auto)", "linear BT probe", "share of the loss recovered"],
         [[k, v["pairs"], v["flipped_kept"], v["held_out_accuracy"], v["probe_held_out_accuracy"],
           r["share_recovered"].get(k)] for k, v in training.items()]),
    ]


def curate(r: dict) -> list[Table]:
    tables = _curate_section(r, "hh-rlhf pairs")
    if "synthetic_pairs" in r:
        tables += _curate_section(r["synthetic_pairs"], "synthetic pairs")
    bon = r["best_of_n"]
    rows = []
    for n in (k for k in bon if k.isdigit()):
        for rule, cell in bon[n].items():
            if isinstance(cell, dict) and "true_reward" in cell:
                rows.append([n, rule, cell["true_reward"], cell.get("truly_low_picked")])
        rows.append([n, "oracle (true best)", bon[n]["oracle_true_reward"], None])
        rows.append([n, "random", bon[n]["random_true_reward"], None])
    tables.append(("best-of-n on the synthetic pool: true reward of the row each rule picks (mean ± sd over seeds); "
                   f"score-truth Pearson r {fmt(bon['score_truth_pearson'])}",
                   ["n", "rule", "true reward", "share truly low"], rows))
    return tables


def demo_clone(r: dict) -> list[Table]:
    return [("", ["what", "value"], [["`make demo` on a fresh clone, seconds", r["fresh_clone_seconds"]],
                                     ["`make demo` again (caches in place), seconds", r["rerun_seconds"]],
                                     ["backbone converted from the GGUF in the run", r["cold_backbone"]],
                                     ["commit", r["commit"][:12]]])]


def demo_dtype(r: dict) -> list[Table]:
    return [(r["rows"], ["dtype", "tokens/s"], [[k, v] for k, v in r["tokens_per_s"].items()]),
            ("", ["what", "value"], [["bf16 / fp32 speed", r["bf16_over_fp32_speed"]],
                                     ["CPU runs bf16 natively", r["native_bf16_cpu"]],
                                     ["auto-bf16 picks", r["auto_bf16_picks"]],
                                     *[[f"bf16 vs fp32 features: {k.replace('_', ' ')}", v]
                                       for k, v in r["bf16_vs_fp32_features"].items()]])]


def evaluate_real(r: dict) -> list[Table]:
    t = r["targets"]
    s1, s2 = r["stage1_val"], r["stage2_val"]
    attrs = list(t["coverage90_calibrated"])
    tables = [
        ("stage 1 on held-out ratings (" + s1.get("estimate", "validation") + ")",
         ["MSE", "Pearson r", "Spearman r", "NLL", "mean sigma", "coverage 50%", "coverage 90%"],
         [[s1["mse"], s1["pearson"], s1["spearman"], s1["nll"], s1["mean_sigma"], s1["coverage50"], s1["coverage90"]]]),
        ("coverage of the central 90% interval on the held-out ratings (target 0.85-0.95)",
         ["attribute", "calibrated", "reparam alone", "within target"],
         [[a, t["coverage90_calibrated"][a], t["coverage90_reparam_alone"].get(a),
           t["coverage90_within_0.85_0.95"].get(a)] for a in attrs]),
        (f"stage 2 on the validation pairs (gate chosen: {s2.get('gate')})",
         ["model", "accuracy", "BT loss", "ECE", "Brier", "ECE (Gaussian)"],
         [["gate", s2["accuracy"], s2["bt_loss"], s2["ece"], s2["brier"], s2["ece_gaussian"]],
          ["equal weights", s2["equal_weights"]["accuracy"], s2["equal_weights"]["bt_loss"],
           s2["equal_weights"]["ece"], s2["equal_weights"]["brier"], s2["equal_weights"]["ece_gaussian"]]]),
        ("held-out pair sets", ["pairs", "accuracy", "ECE at the fitted T", "ECE if calibrated (noise floor)",
                                "best signal", "its AUROC for wrong pairs", "most certain half above overall"],
         [[k, v["accuracy"], v["ece_at_temperature"], v["ece_if_calibrated"], v["best_signal"], v["best_auroc"],
           v["most_certain_half_above_overall"]] for k, v in t["pairs"].items()]),
    ]
    signals = sorted({s for v in t["shift"].values() for s in v["auroc"]})
    tables.append(("shift: AUROC with which each row signal tells another source's rows from held-out training rows",
                   ["other source", *signals], [[k, *(v["auroc"].get(s) for s in signals)]
                                                for k, v in t["shift"].items()]))
    return tables


def epistemic_shift(r: dict) -> list[Table]:
    c, z = r["cost"], r["cost_at_size"]
    signals = ["epistemic_std", "ensemble_std", "score_std", "mean_sigma"]
    return [
        (f"shift: AUROC with which each row signal tells another source's rows from held-out SteerLM rows "
         f"({r['train_rows']} training rows, d = {r['hidden_size']}, {', '.join(r['decomposition'])})",
         ["other source", "rows (reference rows)", *signals, "epistemic - bootstrap, 90% interval"],
         [[k, f"{v['rows']} ({v['reference_rows']})", *(v["auroc"].get(s) for s in signals),
           " to ".join(fmt(x) for x in v["epistemic_minus_bootstrap_90ci"])] for k, v in r["shift"].items()]),
        ("cost on these real rows, side by side (median of the repeats)", ["what", "seconds"],
         [["fit, 1 member", c["fit_1_member_seconds"]], ["fit, 8 bootstrap members", c["fit_8_members_seconds"]],
          ["training the 8 bootstrap members (the difference)", c["training_8_bootstrap_members_seconds"]],
          [f"posterior factor + epistemic_std of {c['epistemic_rows_scored']} rows", c["epistemic_seconds"]],
          ["members / epistemic", c["members_over_epistemic"]]]),
        (f"cost on seeded features of {z['rows']} x {z['hidden_size']} ({', '.join(z['decomposition'])}), side by "
         "side (median of the repeats)", ["what", "seconds"],
         [["fit, 1 member", z["fit_1_member_seconds"]], ["fit, 8 bootstrap members", z["fit_8_members_seconds"]],
          ["training: the 8 bootstrap members (the difference)", z["training_8_bootstrap_members_seconds"]],
          ["training: the posterior factor from the fit's spectrum", z["posterior_factor_seconds"]],
          ["members / posterior factor", z["members_over_posterior_factor"]],
          ["at least 5x faster", z["at_least_5x_faster"]],
          [f"inference: epistemic_std of {z['inference_rows']} rows", z["epistemic_std_seconds"]],
          [f"inference: the 8 members' scores of {z['inference_rows']} rows", z["8_members_scores_seconds"]]]),
        ("the number's scale on the held-out rated rows (equal if s^2 and the epistemic variance are both right)",
         ["attribute", "held-out MSE", "s^2 (leave-one-out MSE)", "mean epistemic var", "s^2 + epistemic var",
          "mean epistemic var, training rows"],
         [[a, v["held_out_mse"], v["loo_mse_s2"], v["mean_epistemic_var"], v["s2_plus_epistemic"],
           v["mean_epistemic_var_train"]] for a, v in r["held_out_scale"].items()]),
    ]


def export_speed(r: dict) -> list[Table]:
    ex, sc = r["export"], r["scoring"]
    return [("export onto the converted SmolLM2 checkpoint (best of the repeats)",
             ["way", "seconds", "bytes written"],
             [[k, v["seconds"], v["bytes_written"]] for k, v in ex.items() if isinstance(v, dict)]),
            (f"scoring {sc['conversations']} conversations ({sc['rows']}, {sc['tokens']:,} tokens)",
             ["way", "seconds", "rows/s", "tokens/s"],
             [[k, v["seconds"], v["rows_per_s"], v["tokens_per_s"]] for k, v in sc.items() if isinstance(v, dict)]),
            ("", ["ratio", "value"], [["export: hardlink vs load and save", ex["speedup_link_vs_load_and_save"]],
                                      ["scoring: batched vs one at a time", sc["speedup_batched_vs_one_at_a_time"]]])]


def extract_engines(r: dict) -> list[Table]:
    rows = r["rows"]
    return [(f"{rows['conversations']} conversations ({rows['pairs']} pairs), {rows['tokens']:,} tokens",
             ["run", "engine", "dtype", "prefix caching", "threads", "tokens/s", "startup s", "padding share",
              "prefix-cached share", "peak RSS GB"],
             [[k, v["engine"], v["dtype"], v["prefix_caching"], v["torch_threads"], v["tokens_per_s"], v["startup_s"],
               v["padding_share"], v["prefix_cached_share"], v["peak_rss_gb"]] for k, v in r["runs"].items()]),
            ("", ["ratio", "value"], [[k, v] for k, v in r["ratios"].items()]),
            ("feature agreement", ["pair", "max abs diff", "max relative diff", "min cosine", "rows within 1e-4"],
             [[k, v["max_abs_diff"], v["max_relative_diff"], v["min_cosine"], f"{v['rows_within_1e-4']} / {v['rows']}"]
              for k, v in r["feature_agreement"].items()])]


def extract_speed(r: dict) -> list[Table]:
    ways = {k: v for k, v in r.items() if isinstance(v, dict) and "tokens_per_s" in v}
    return [(f"{r['rows']}; this machine's fp32 matmul rate {fmt(r['fp32_matmul_gflops'])} GFLOP/s",
             ["way", "rows", "tokens", "tokens/s", "share of the matmul rate", "padding share"],
             [[k, v["rows"], v["tokens"], v["tokens_per_s"], v["share_of_fp32_matmul_rate"], v.get("padding_share")]
              for k, v in ways.items()]),
            ("", ["ratio / target", "value"], [["ours vs one at a time", r["speedup_vs_one_at_a_time"]],
                                               *[[k, v] for k, v in r["targets"].items()]])]


def gating_real(r: dict) -> list[Table]:
    s1 = r["stage1_val"]
    return [(f"{r['data']['pairs']}; {r['data']['validation_pairs']} validation pairs; ratings {r['data']['ratings']}",
             ["model", "validation accuracy", "BT loss"],
             [["URM gate", r["gate_val_accuracy"], r["gate_val_bt_loss"]],
              ["equal weights", r["equal_weights_val_accuracy"], r["equal_weights_val_bt_loss"]]]),
            ("gate weights across prompts", ["attribute", "mean", "std"],
             [[a, m, r["gate_weights_std_across_prompts"].get(a)] for a, m in r["gate_weights_mean"].items()]),
            ("stage 1 (validation)", ["MSE", "Pearson r", "coverage 90%", "extract seconds", "gate epochs"],
             [[s1["mse"], s1["pearson"], s1["coverage90"], r["extract_seconds"], r["stage2_epochs_run"]]])]


def out_of_core(r: dict) -> list[Table]:
    s1, s2 = r["stage1"], r["stage2"]
    return [("features streamed from the cache's parts vs held in memory (best run of each)",
             ["stage", "rows", "feature GB", "in memory /s", "streamed /s", "streamed / in memory", "peak held GB",
              "bit-identical heads"],
             [["stage 1 (examples)", s1["rows"], s1["feature_gb"], s1["in_memory_examples_per_s"],
               s1["streamed_examples_per_s"], s1["streamed_over_in_memory"], s1["streamed_peak_held_gb"],
               s1["bit_identical_heads"]],
              ["stage 2 (pairs)", s2["pairs"], s2["feature_gb"], s2["in_memory_pairs_per_s"], s2["streamed_pairs_per_s"],
               s2["streamed_over_in_memory"], s2["streamed_peak_held_gb"], s2["bit_identical_heads"]]])]


def published_gap(r: dict) -> list[Table]:
    keys = ("hidden_size", "gate_hidden", "scored_pairs", "score_abs_max", "gap_max", "gap_mean", "gap_median",
            "pair_decisions_flipped", "smallest_pair_margin", "seconds")
    return [("", ["what", "value"], [[k.replace("_", " "), r[k]] for k in keys])]


def serve_load(r: dict) -> list[Table]:
    c = r["config"]
    tables = []
    for name, w in r["workloads"].items():
        modes = {k: v for k, v in w.items() if isinstance(v, dict) and "requests_per_s" in v}
        q = w["query_tokens"]
        tables.append((f"workload `{name}` (query tokens {q['min']}-{q['max']}, median {fmt(q['median'])}): "
                       f"{c['clients']} clients, {c['requests']} requests per mode in {c['rounds']} rounds",
                       ["mode", "requests/s", "p50 ms", "p99 ms", "max ms", "model calls", "largest call", "wrong or lost"],
                       [[k, v["requests_per_s"], v["latency_ms"]["p50"], v["latency_ms"]["p99"], v["latency_ms"]["max"],
                         v.get("model_calls"), v.get("largest_call_requests"),
                         v["requests"] - v["answered_correctly"]] for k, v in modes.items()]))
        ratios = w.get("ratios_to_today") or ({"dynamic / one at a time": w["ratios"]} if "ratios" in w else {})
        if ratios:
            keys = list(next(iter(ratios.values())))
            tables.append(("ratios" + (" to `today` (the code before the transforms)" if "ratios_to_today" in w else ""),
                           ["mode", *keys], [[k, *(v.get(x) for x in keys)] for k, v in ratios.items()]))
        if "answer_us" in w:
            tables.append(("microseconds per answer spent on the reward", list(w["answer_us"]),
                           [list(w["answer_us"].values())]))
    return tables


def sigma_recovery(r: dict) -> list[Table]:
    true = r["true_noise_std"]
    attrs = list(true)
    return [("validation mean sigma per attribute beside the true noise std",
             ["recipe", *attrs, "MSE", "coverage 50%", "coverage 90%"],
             [["true noise std", *true.values(), None, 0.5, 0.9]]
             + [[k, *(v["mean_sigma"].get(a) for a in attrs), v["mse"], v["coverage50"], v["coverage90"]]
                for k, v in r["losses"].items()])]


def train_heads(r: dict) -> list[Table]:
    c, s1, s2 = r["config"], r["stage1"], r["stage2"]
    ridge, glob = r.get("stage1_ridge", {}), r.get("stage2_global_gate", {})
    mm = r["matmul_4096_fp32_gflops"]
    mm = mm if isinstance(mm, dict) else {"after": mm}
    tables = [(f"d = {c['dim']}, {c['ratings']:,} ratings, {c['pairs']:,} pairs; fp32 matmul "
               + " / ".join(f"{fmt(v)} ({k})" for k, v in mm.items()) + " GFLOP/s",
               ["step", "measure", "value"],
               [["stage 1, AdamW", "examples/s", s1["examples_per_s"]],
                ["stage 1, AdamW", "share of the matmul peak", s1["share_of_matmul_peak"]],
                ["stage 2, global weight vector (L-BFGS)", "seconds", glob.get("global_weights_seconds")],
                ["stage 2, frozen value head's outputs", "seconds", glob.get("frozen_head_precompute_seconds")],
                [f"stage 2, {s2['gate']} gate (hidden {s2['hidden']})", "pairs/s", s2["pairs_per_s"]],
                [f"stage 2, {s2['gate']} gate", "share of the matmul peak", s2["share_of_matmul_peak"]],
                [f"stage 2, {s2['gate']} gate", "seconds per epoch (estimate)", s2["epoch_seconds_estimate"]]])]
    runs = ridge.get("runs", {})
    if runs:
        tables.append((f"stage 1 in closed form (ridge), {ridge.get('rows', 0):,} ratings with {ridge.get('labels')} "
                       "labels, each fit a child process, one after the other",
                       ["run (checkout, members)", "commit", "wall s", "CPU s", "peak RSS bytes"],
                       [[name, run.get("commit"), run.get("seconds"), run.get("cpu_seconds"), run.get("peak_rss_bytes")]
                        for name, run in runs.items()]))
    extra = [[f"{k} {sub}".strip(), v] for k, vs in ridge.items() if k.startswith(("speedup", "max_relative_difference"))
             for sub, v in (vs.items() if isinstance(vs, dict) else [("", vs)])]
    if extra:
        tables.append(("", ["closed form, before / after", "value"], extra))
    return tables


def gate_auto_real(r: dict) -> list[Table]:
    rows = []
    for data, runs in r["runs"].items():
        for name in ("before", "after"):
            if name in runs:
                run = runs[name]
                rows.append([data, f"{name} ({run['commit']})", run["wall_seconds"], run["cpu_seconds"],
                             run["gate_choice_seconds"], run["gate_chosen"], run["val_accuracy"]])
    speed = [[data, k, v] for data, runs in r["runs"].items() for k, v in runs.get("speedup", {}).items()]
    same = [[data, "same gate before and after", runs["same_gate"]] for data, runs in r["runs"].items()
            if "same_gate" in runs]
    return [("`urm train-heads` (defaults, `--gate auto`), each run a child process",
             ["pairs", "checkout", "wall s", "CPU s", "gate choice s", "gate chosen", "val accuracy"], rows),
            ("", ["pairs", "before / after", "value"], speed + same)]


def full_shape(r: dict) -> list[Table]:
    runs = r["runs"]
    steps = list(next(iter(runs.values()))["steps"])
    header = ["step"] + [f"{name} ({run['commit']}): {what}" for name, run in runs.items()
                         for what in ("wall s", "peak RSS / backbone bytes")]
    rows = [[step] + [v for run in runs.values() for v in (run["steps"].get(step, {}).get("wall_seconds"),
                                                           run["steps"].get(step, {}).get("peak_rss_ratio"))]
            for step in steps]
    return [(f"{r['layers']} layers, backbone {r['backbone_bytes'] / 1e9:.2f} GB in bf16; rows: "
             + ", ".join(f"{v} {k}" for k, v in r["rows"].items()), header, rows),
            ("", ["what", "value"], [["largest peak RSS / backbone bytes (after)", r["max_peak_rss_ratio"]],
                                     ["every ratio <= 1.5", r["every_ratio_at_most_1.5"]]])]


def _ci(x: dict) -> str:
    """A statistic over seeds as mean [90% interval]."""
    return f"{fmt(x['mean'])} [{fmt(x['ci90'][0])}, {fmt(x['ci90'][1])}]"


def overopt(r: dict) -> list[Table]:
    g = r["gold"]
    top = str(r["ns"][-1])
    tables = [
        ("How the experiment runs (bench/overopt.py's docstring, as stored in the result)", ["step", "how"],
         [[k, v] for k, v in r["method"].items()]),
        (f"The gold reward: per attribute, kernel ridge on the pool's real labels (RBF length {fmt(g['bandwidth'])}); a "
         f"linear function of the features reaches {fmt(g['linear_share'])} of the gold's variance on the pool "
         f"(LOO R^2). {r['pool']['rows']:,} responses; per seed {r['pool']['candidates_per_seed']} best-of-n candidates, "
         f"{r['pool']['shift_candidates_per_seed']} from the shift sources. {r['seeds']} seeds"
         + (" (--quick)" if r["quick"] else "") + f"; wall {fmt(r['wall_seconds'])} s, of it extraction "
         f"{fmt(r['extract_seconds'])} s.",
         ["attribute", "gold weight", "real labels", "alpha", "LOO R^2 on the real labels"],
         [[a, w, f["labelled_rows"], f["alpha"], f["loo_r2"]] for (a, w), f in zip(g["weights"].items(), g["attributes"])]),
        ("The gold by source (pool std units), and the share of each source's real pairs whose chosen side the gold "
         "prefers", ["source", "rows", "gold mean", "gold std", "real chosen preferred"],
         [[s, v["rows"], v["mean"], v["std"], g["real_pairs_agreeing"].get(s)] for s, v in g["by_source"].items()]),
    ]
    rows = []
    for k, p in r["proxies"].items():
        recipe, size, noise = k.split("|")
        for name, v in p["rewards"].items():
            rows.append([recipe, f"{float(size):.0%} ({p['pairs']})", f"{float(noise):.0%}", name,
                         _ci(v["gold_gain"]["4"]), _ci(v["gold_gain"]["16"]), _ci(v["gold_gain"][top]),
                         v["gain_256_over_mean"], _ci(v["gain_256_minus_mean"]), v["seeds_above_mean_256"],
                         v["shift_share"][top]["mean"], v["proxy_gain"][top]["mean"]])
    tables.append((f"Best-of-n: gold gain of the pick over a random pick (gold std units), mean [90% interval] over "
                   f"seeds; n = {top} is KL_bon {fmt(r['kl_bon'][-1])} nats; the oracle (picking by the gold) gains "
                   f"{_ci(r['oracle_gold_gain'][top])} at n = {top}. Curves: [{r['plot']}](../{r['plot']})",
                   ["recipe", "size (pairs)", "flipped", "reward", "gain n = 4", "gain n = 16", f"gain n = {top}",
                    f"/ mean's at {top} (ratio of means)", f"minus mean's at {top} (paired)",
                    f"seeds above mean's at {top}", f"picks from shift sources at {top}", f"proxy's own gain at {top}"],
                   rows))
    sweep = [[k.split("|")[0], f"{float(k.split('|')[2]):.0%}", t, *(_ci(v) for v in risks.values())]
             for k, p in r["proxies"].items() if k.split("|")[1] == str(max(r["sizes"]))
             for t, risks in p["risk_sweep_gain_256"].items()]
    if sweep:
        risks = list(next(iter(next(iter(r["proxies"].values()))["risk_sweep_gain_256"].values())))
        tables.append((f"The risk parameter (k of lcb and elcb, lambda of uwo; the default is 1): gold gain at n = {top}, "
                       "full size", ["recipe", "flipped", "reward", *(f"risk {k}" for k in risks)], sweep))
    t = r["targets"]
    if t:
        tables.append(("Targets (default recipe, full size, n = 256)", ["what", "value"],
                       [["best conservative reward under 25% flipped", t["best_conservative_under_noise"]],
                        ["its gain / mean's at 25% flipped", t["gain_ratio_at_25pct"]],
                        ["90% intervals apart at 25% flipped", t["intervals_apart_at_25pct"]],
                        ["its gain minus mean's, paired over seeds, 25% flipped", _ci(t["paired_difference_at_25pct"])],
                        ["seeds where it beats mean, 25% flipped", t["seeds_above_mean_at_25pct"]],
                        ["its gain minus mean's, paired over seeds, 0% flipped", _ci(t["paired_difference_at_0pct"])],
                        ["target: >= 1.3 x mean's gain, intervals apart (25% flipped)", t["target_30pct_more_at_25pct"]],
                        ["its gain / mean's at 0% flipped", t["gain_ratio_at_0pct"]],
                        ["target: loses <= 5% of mean's gain (0% flipped)", t["target_loses_le_5pct_at_0pct"]]]))
    c = r["curation"]
    tables.append(("Curation, default recipe, 25% flipped: AUROC with which each signal ranks the flipped training "
                   "pairs first, and the pairs whose label disagrees with the gold order (flips and BT draws)",
                   ["signal", "AUROC, flipped", "AUROC, label against the gold"],
                   [[s, _ci(v), _ci(c["auroc_label_against_gold"][s])] for s, v in c["auroc_flipped"].items()]))
    tables.append((f"Curation: accuracy on the held-out pairs ordered by the gold after training the gate on each set; "
                   f"curated minus random control: {_ci(c['curated_minus_random_control'])}",
                   ["training pairs", "pairs", "flipped kept", "held-out gold accuracy", "gates chosen"],
                   [[n, c["pairs_kept"][n]["mean"], c["flipped_kept"][n]["mean"], _ci(v),
                     ", ".join(f"{g} {k}" for g, k in c["gates"][n].items())]
                    for n, v in c["held_out_gold_accuracy"].items()]))
    return tables


LAYOUTS: dict[str, Callable[[dict], list[Table]]] = {
    "cache_read": cache_read, "curate": curate, "demo_clone": demo_clone, "demo_dtype": demo_dtype,
    "epistemic_shift": epistemic_shift,
    "evaluate_real": evaluate_real, "export_speed": export_speed, "extract_engines": extract_engines,
    "extract_speed": extract_speed, "gating_real": gating_real, "out_of_core": out_of_core,
    "published_gap": published_gap, "serve_load": serve_load, "serve_load_export": serve_load,
    "serve_load_rewards": serve_load, "sigma_recovery": sigma_recovery, "train_heads": train_heads,
    "gate_auto_real": gate_auto_real, "full_shape": full_shape, "overopt": overopt, "overopt_quick": overopt,
}


# ----------------------------------------------------------------------------------------------
# The page


def docstring_summary(module: str) -> str | None:
    """The first paragraph of bench/MODULE.py's docstring, on one line (read from the source, not imported)."""
    path = ROOT / "bench" / f"{module}.py"
    if not path.is_file():
        return None
    doc = ast.get_docstring(ast.parse(path.read_text()))
    return " ".join(doc.split("\n\n")[0].split()) if doc else None


def machine_line(r: dict) -> str:
    m = r.get("machine") or {}
    before = r.get("load_average_before") or m.get("load_average_before")
    load = before or m.get("load_average")
    parts = [m.get("processor"), f"{m['cpu_count']} CPUs" if m.get("cpu_count") else None,
             f"torch {m['torch']}" if m.get("torch") else None,
             f"{r['torch_threads']} torch thread{'s' * (r['torch_threads'] != 1)}" if r.get("torch_threads") else None,
             f"load average {' / '.join(f'{x:.1f}' for x in load)} (1 / 5 / 15 min) "
             + ("when it started" if before else "when it ended") if load else None]
    parts = [p for p in parts if p]
    return "Machine: " + ", ".join(parts) + "." if parts else "Machine: not recorded."


def section(stem: str, result) -> list[str]:
    module, command, note = WRITTEN_BY.get(stem, (stem, f"python -m bench {stem}", None))
    lines = [f"## {stem}", ""]
    summary = docstring_summary(module)
    if summary:
        lines += [summary, ""]
    if not isinstance(result, dict):
        return lines + [f"`bench/results/{stem}.json` is not a JSON object; nothing to show.", ""]
    if result.get("what") and result["what"] != summary:
        lines += [f"Measured: {fmt(result['what'])}", ""]
    where = f"writes `bench/results/{stem}.json`" + (f"; {note}" if note else "")
    lines += [f"Rerun: `{command}` ({where}). {machine_line(result)}", ""]
    try:
        tables = LAYOUTS[stem](result) if stem in LAYOUTS else None
        note = None
    except (KeyError, TypeError, AttributeError, StopIteration, ValueError) as e:
        tables = None
        note = f"(This file's layout is not the one this page knows ({type(e).__name__}: {e}): its numbers, as stored.)"
    if tables is None:
        if note:
            lines += [note, ""]
        tables = [("", ["key", "value"], [[k, v] for k, v in number_leaves(result)])]
    for caption, header, rows in tables:
        if caption:
            lines += [caption, ""]
        lines += markdown_table(header, rows) + [""]
    return lines


def render(results: Path = RESULTS) -> str:
    """The page, from every bench/results/*.json (file-name order)."""
    files = sorted(results.glob("*.json"))
    lines = ["# Benchmarks", "",
             "Generated by `python -m bench report` from `bench/results/*.json`; do not edit by hand (a test checks that "
             "this page is what the command writes). Each benchmark is a module of `bench/` that writes one of those "
             "files; rerun one with the command in its section, then rewrite this page:", "",
             "```bash", "python -m bench report    # docs/benchmarks.md from bench/results/*.json", "```", "",
             "Speeds were measured on shared, loaded machines (the load average is given): compare the ratios measured "
             "side by side in one run, not absolute rates across sections. Numbers: 3 significant digits; ± is the "
             "standard deviation over seeds.", "",
             "Contents: " + ", ".join(f"[{p.stem}](#{p.stem})" for p in files), ""]
    for path in files:
        try:
            result = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            lines += [f"## {path.stem}", "", f"`bench/results/{path.name}` could not be read: {e}.", ""]
            continue
        lines += section(path.stem, result)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of result JSON files")
    ap.add_argument("--out", default=str(PAGE), help="the page to write")
    args = ap.parse_args(argv or [])
    from pipeline.atomic import write_text

    out = write_text(Path(args.out), render(Path(args.results)))
    print(f"-> {out}")
