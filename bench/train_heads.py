"""How fast the two training stages run at the published model's shapes, against this machine's matmul peak.

Shapes of URM-LLaMa-3.1-8B's training: 20k ratings (HelpSteer2) and 80k pairs (Skywork 80K) =
160k rows, d = 4096, random float16 features held in memory, random labels (for the closed form: ratings
with a linear signal in the features, ``--ridge-labels``). Stage 1: the default closed form (``--loss ridge``)
end to end with the default 8 bootstrap members (and one, ``--ridge-one-member-too``; each fit in a child process, ``bench/ridge_fit.py``;
with ``--reference DIR`` also under that earlier checkout, side by side, and the two fits' tensors compared);
and one full epoch of the AdamW loop (``--loss nll``) after a warm-up epoch (the per-epoch training time it records,
validation excluded). Stage 2: the global weight vector `--gate auto` tries (L-BFGS); and the real
inner loop (``gate_epoch``) over a fixed number of steps after warm-up steps, with the URM gate
(hidden = d) and the frozen head's outputs precomputed.

FLOPs model (per example; the features need no gradient, so the first layer has no input grad):
  stage 1: forward 2 d 2K M, backward (weight grad only) the same: 2 x forward.
  stage 2: per row forward F = 2 (d h + h h + h K); backward = weight grads (F) + input grads of
  layers 2-3 (2 (h h + h K)); two rows (chosen, rejected) per pair. About 3 x forward.
The share of peak is achieved FLOP/s over a torch.mm of 4096 x 4096 fp32 timed in the same run.
Figures go to bench/results/train_heads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench import machine_info, matmul_gflops, timed, write_result
from pipeline.configs import GatingConfig, ValueHeadConfig, build
from pipeline.model import Heads
from pipeline.train import TensorRows, adamw, fit_value_head, frozen_outputs, gate_epoch, with_gate
from pipeline.train.gates import GatePairs, PairOutputs
from bench.ridge_fit import random_features

K = 5
ROOT = Path(__file__).resolve().parents[1]
RIDGE_FIT = Path(__file__).resolve().parent / "ridge_fit.py"


def bench_stage1(rows: int, d: int, members: int, batch_size: int, device: str = "cpu") -> dict:
    x = random_features(rows, d, seed=0).to(device)
    y = torch.randint(0, 5, (rows, K), generator=torch.Generator().manual_seed(1)).float()
    cfg = build(ValueHeadConfig, dict(loss="nll", epochs=2, patience=10, batch_size=batch_size, ensemble=members,
                                       device=device))
    t = time.perf_counter()
    fit = fit_value_head(x, y, cfg)
    total = time.perf_counter() - t
    epoch = fit.history[-1]  # the second epoch: code paths and caches warm
    examples = epoch["examples_per_s"] * epoch["seconds"]  # members x training rows
    flops = 2 * (2 * d * 2 * K) * examples  # forward + weight grad
    return {"rows": rows, "train_rows": examples / members, "members": members, "batch_size": batch_size,
            "epoch_seconds": epoch["seconds"], "examples_per_s": examples / epoch["seconds"],
            "rows_per_s": examples / members / epoch["seconds"],
            "feature_gb_per_s": examples * d * 2 / epoch["seconds"] / 1e9,  # float16 rows gathered
            "flops_per_example": 4 * d * 2 * K, "gflops_per_s": flops / epoch["seconds"] / 1e9,
            "fit_seconds_2_epochs_with_validation": total}


def bench_stage1_ridge(rows: int, d: int, members: int, labels: str, reference: str | None,
                       one_member_too: bool = False) -> dict:
    """The default stage 1 (``--loss ridge``): the whole closed-form fit, penalties by leave-one-out, sigma, the
    calibration and ``members`` bootstrap refits, timed end to end (no epochs: it is solved once), with ``members``
    members (and 1, with ``one_member_too``), each fit in a child process (``bench/ridge_fit.py``) under this checkout and, with
    ``reference``, under that one too, one after the other; then how far the two fits' tensors are apart."""
    from safetensors.torch import load_file

    from bench.measured import checkout_commit, checkout_python, run_measured

    out = {"rows": rows, "members": members, "labels": labels, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for m in sorted({1, members} if one_member_too else {members}):
            for name, checkout in (("after", None), ("before", reference)):
                if name == "before" and checkout is None:
                    continue
                heads = Path(tmp) / f"{name}-{m}.safetensors"
                run = run_measured([str(checkout_python(checkout)), str(RIDGE_FIT), "--rows", str(rows), "--dim",
                                    str(d), "--members", str(m), "--labels", labels, "--out", str(heads)],
                                   cwd=checkout or ROOT)
                if run["returncode"] != 0:
                    raise SystemExit(f"bench/ridge_fit.py failed under {checkout or ROOT}:\n{run['output_tail']}")
                record = json.loads(run["output_tail"].strip().splitlines()[-1])
                out["runs"][f"{name}_{m}"] = {"commit": checkout_commit(checkout), **record}
                print(f"  ridge {name}, {m} member(s): {record['seconds']:.1f} s ({record['cpu_seconds']:.1f} s CPU)",
                      flush=True)
            if reference:
                a, b = load_file(Path(tmp) / f"after-{m}.safetensors"), load_file(Path(tmp) / f"before-{m}.safetensors")
                out[f"max_relative_difference_{m}"] = max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30))
                                                          for k in b)
                runs = out["runs"]
                out[f"speedup_{m}"] = {"wall": runs[f"before_{m}"]["seconds"] / runs[f"after_{m}"]["seconds"],
                                       "cpu": runs[f"before_{m}"]["cpu_seconds"] / runs[f"after_{m}"]["cpu_seconds"]}
    return out


def bench_global_gate(pairs: int, d: int, device: str = "cpu") -> dict:
    """The constant gates `--gate auto` tries first: the global weight vector by L-BFGS over every pair's frozen
    value-head outputs (the outputs' precompute timed apart)."""
    from pipeline.train import global_weights

    value = Heads(d, K)
    chosen, rejected = random_features(pairs, d, seed=2).to(device), random_features(pairs, d, seed=3).to(device)
    t = time.perf_counter()
    (mu_c, _), (mu_r, _) = frozen_outputs(value, chosen), frozen_outputs(value, rejected)
    precompute = time.perf_counter() - t
    t = time.perf_counter()
    global_weights(mu_c, mu_r)
    return {"pairs": pairs, "global_weights_seconds": time.perf_counter() - t, "frozen_head_precompute_seconds": precompute}


def bench_stage2(pairs: int, d: int, hidden: int, batch_size: int, steps: int, warmup: int,
                 device: str = "cpu") -> dict:
    chosen, rejected = random_features(pairs, d, seed=2).to(device), random_features(pairs, d, seed=3).to(device)
    value = Heads(d, K)
    cfg = build(GatingConfig, dict(gate="urm", gate_hidden=hidden, gate_batch_size=batch_size, device=device))
    heads = with_gate(value, cfg).to(device)
    t = time.perf_counter()
    (mu_c, ls_c), (mu_r, ls_r) = frozen_outputs(heads, chosen), frozen_outputs(heads, rejected)
    precompute = time.perf_counter() - t
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = adamw(params, cfg.optim)
    order = torch.randperm(pairs, generator=torch.Generator().manual_seed(0)).to(device)
    pairs_of = GatePairs(TensorRows(chosen, rejected), PairOutputs(mu_c, ls_c, mu_r, ls_r))
    gate_epoch(heads, opt, pairs_of, order[:warmup * batch_size], batch_size)
    timed_order = order[warmup * batch_size:(warmup + steps) * batch_size]
    seconds = timed(lambda: (gate_epoch(heads, opt, pairs_of, timed_order, batch_size),
                             torch.cuda.synchronize() if torch.device(device).type == "cuda" else None))
    forward_row = 2 * (d * hidden + hidden * hidden + hidden * K)
    per_pair = 2 * (2 * forward_row + 2 * (hidden * hidden + hidden * K))
    return {"pairs": pairs, "rows": 2 * pairs, "hidden": hidden, "gate": "urm", "batch_size": batch_size,
            "steps_timed": steps, "warmup_steps": warmup, "seconds": seconds,
            "pairs_per_s": len(timed_order) / seconds, "rows_per_s": 2 * len(timed_order) / seconds,
            "epoch_seconds_estimate": pairs * 0.9 / (len(timed_order) / seconds),
            "flops_per_pair": per_pair, "forward_flops_per_pair": 2 * forward_row,
            "gflops_per_s": per_pair * len(timed_order) / seconds / 1e9,
            "frozen_head_precompute_seconds": precompute}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench train_heads")
    ap.add_argument("--ratings", type=int, default=20_000)
    ap.add_argument("--pairs", type=int, default=80_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--members", type=int, default=1, help="stage-1 ensemble size M of the AdamW loop")
    ap.add_argument("--ridge-members", type=int, default=8, help="bootstrap members of the closed form (its default)")
    ap.add_argument("--stage1-batch", type=int, default=1024)
    ap.add_argument("--stage2-batch", type=int, default=512)
    ap.add_argument("--stage2-steps", type=int, default=20, help="timed stage-2 steps (after warm-up)")
    ap.add_argument("--stage2-warmup", type=int, default=2)
    ap.add_argument("--gate-hidden", type=int, default=None, help="default: d (the published URM)")
    ap.add_argument("--ridge-labels", choices=("linear", "random"), default="linear",
                    help="ratings with a linear signal in the features (the penalty inside its grid, as on real data), "
                         "or random ones (the penalty at the grid's top edge)")
    ap.add_argument("--reference", default=None,
                    help="an earlier checkout (with its .venv) whose closed-form fit is timed beside this one's")
    ap.add_argument("--ridge-one-member-too", action="store_true",
                    help="also time the closed form with one member (no bootstrap)")
    args = ap.parse_args(argv or [])
    load_before = list(os.getloadavg())
    peak = matmul_gflops()
    s1 = bench_stage1(args.ratings, args.dim, args.members, args.stage1_batch)
    ridge = bench_stage1_ridge(args.ratings, args.dim, args.ridge_members, args.ridge_labels, args.reference,
                               args.ridge_one_member_too)
    constant = bench_global_gate(args.pairs, args.dim)
    s2 = bench_stage2(args.pairs, args.dim, args.gate_hidden or args.dim, args.stage2_batch,
                      args.stage2_steps, args.stage2_warmup)
    peak_after = matmul_gflops()
    for s in (s1, s2):
        s["share_of_matmul_peak"] = s["gflops_per_s"] / max(peak, peak_after)
    result = {
        "what": "stage-1 and stage-2 training throughput on CPU at URM-LLaMa-3.1-8B shapes, random "
                "float16 features in memory; share of the fp32 torch.mm peak measured in the same run",
        "config": vars(args), "torch_threads": torch.get_num_threads(),
        "matmul_4096_fp32_gflops": {"before": peak, "after": peak_after},
        "flops_model": __doc__.split("FLOPs model")[1].split("Figures go")[0].strip(),
        "stage1": s1, "stage1_ridge": ridge, "stage2_global_gate": constant, "stage2": s2,
        "load_average_before": load_before, "machine": machine_info(),
    }
    path = write_result("train_heads", result)
    print(f"matmul fp32 {peak:.0f} / {peak_after:.0f} GFLOP/s (before / after)\n"
          f"stage 1: {s1['examples_per_s']:.0f} examples/s (epoch of {s1['train_rows']:.0f} rows in "
          f"{s1['epoch_seconds']:.2f} s), {s1['feature_gb_per_s']:.2f} GB/s of float16 features, "
          f"{s1['gflops_per_s']:.1f} GFLOP/s = {s1['share_of_matmul_peak']:.1%} of peak\n"
          f"stage 1 ridge (the default): " + json.dumps({k: v for k, v in ridge.items() if k != "runs"}) + "\n"
          f"stage 2 global weights: {constant}\n"
          f"stage 2: {s2['pairs_per_s']:.0f} pairs/s ({s2['steps_timed']} steps of {s2['batch_size']} in "
          f"{s2['seconds']:.1f} s; epoch ~{s2['epoch_seconds_estimate']:.0f} s), {s2['gflops_per_s']:.1f} "
          f"GFLOP/s = {s2['share_of_matmul_peak']:.1%} of peak\n"
          f"load {load_before} -> {result['machine']['load_average']}\n-> {path}")
    return result
