"""`python -m bench` runs every benchmark in BENCHES, then `report`; `python -m bench NAME [NAME ...] [--option ...]`
runs those, passing the options on (e.g. `python -m bench cache_read --rows 20000`); `python -m bench report`
writes docs/benchmarks.md from bench/results/*.json."""

import importlib
import sys

BENCHES = ["cache_read", "extract_speed", "train_heads", "sigma_recovery", "gating_real", "export_speed", "evaluate_real",
           "curate", "demo_dtype", "demo_clone", "serve_load", "out_of_core", "published_gap", "gate_auto_real",
           "full_shape", "epistemic_shift", "overopt"]
# not in `make bench`: gpu needs a CUDA GPU (`make bench-gpu`); extract_engines vLLM (`.venv-vllm/bin/python -m bench
# extract_engines`); serve_engines .venv-vllm beside .venv (`make test-vllm` builds it) and runs/demo/model (`make demo`);
# report writes docs/benchmarks.md from the results (bench/report.py), and runs after the benchmarks when
# `python -m bench` runs them all
ON_REQUEST = ["gpu", "extract_engines", "serve_engines", "report"]


def main(argv: list[str]) -> int:
    n = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, options = argv[:n] or BENCHES, argv[n:]
    unknown = [n for n in names if n not in BENCHES + ON_REQUEST]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {BENCHES + ON_REQUEST}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== bench {name}", flush=True)
        importlib.import_module(f"bench.{name}").main(options)
    if not argv[:n]:  # every benchmark ran: the page follows its results
        importlib.import_module("bench.report").main([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
