"""One closed-form stage 1 (`--loss ridge`, the default) at given shapes, timed: a script any checkout's Python
can run (it imports only ``pipeline``'s public training API, which earlier commits share), so that
``bench train_heads --reference DIR`` times the same fit under this checkout and an earlier one, side by side.

    python bench/ridge_fit.py --rows 20000 --dim 4096 --members 8 --out heads.safetensors

Features: float16 N(0, 1), seeded (as ``bench.train_heads.random_features``). Labels: ``linear`` (default) are
0-4 ratings with a linear signal in the features plus noise, so leave-one-out picks a penalty inside its grid,
as on real data; ``random`` are uniform 0-4 ratings the features do not predict (the penalty then lies at the
grid's top edge, where every solve is easy). Prints one JSON line: the seconds, the selection record; the heads'
tensors go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

K = 5


def random_features(rows: int, d: int, seed: int) -> torch.Tensor:
    """[rows, d] float16 N(0, 1), made in chunks (no full float32 copy)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, d, dtype=torch.float16)
    for i in range(0, rows, 8192):
        out[i:i + 8192] = torch.randn(min(8192, rows - i), d, generator=g)
    return out


def labels(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """[rows, K] ratings 0-4: with a linear signal in x (``linear``) or none (``random``)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randint(0, 5, (len(x), K), generator=g).float()
    a = torch.randn(x.shape[1], K, generator=g) / x.shape[1] ** 0.5
    signal = torch.cat([x[i:i + 8192].float() @ a for i in range(0, len(x), 8192)])
    return (2.0 + signal + 0.7 * torch.randn(len(x), K, generator=g)).round().clamp(0, 4)


def main() -> None:
    from safetensors.torch import save_file

    from pipeline.configs import ValueHeadConfig, build
    from pipeline.train import fit_value_head

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--labels", choices=("linear", "random"), default="linear")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    x = random_features(args.rows, args.dim, seed=0)
    y = labels(x, args.labels, seed=1)
    cfg = build(ValueHeadConfig, dict(ensemble=args.members, device="cpu"))
    t0, cpu0 = time.perf_counter(), time.process_time()
    fit = fit_value_head(x, y, cfg)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    save_file({k: v.contiguous() for k, v in fit.heads.state_dict().items()}, args.out)
    selection = {k: v for k, v in fit.selection.items() if k in ("alpha", "members_solved_by", "decomposition")}
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "selection": selection,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
