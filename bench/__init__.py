"""Benchmarks: `python -m bench` (or `make bench`) runs every module in bench.__main__.BENCHES;
`python -m bench NAME` runs one. Each writes its figures to bench/results/NAME.json."""

import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """What ran the benchmark, and how busy the machine was."""
    import numpy
    import pyarrow
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
        "load_average": list(os.getloadavg()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_result(name: str, result: dict) -> Path:
    """Write bench/results/NAME.json atomically."""
    from pipeline.atomic import write_json

    return write_json(RESULTS / f"{name}.json", result)


def timed(fn) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_clients(client, clients: int) -> float:
    """Wall seconds for ``clients`` threads each running ``client()`` at once (a load generator's clients)."""
    import threading

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def matmul_gflops(n: int = 4096, repeats: int = 3) -> float:
    """This machine's fp32 matmul rate: best-of-``repeats`` torch.mm of n x n (GFLOP/s) after a warm-up."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


def shortest_real_pairs(n: int) -> list:
    """The n shortest real hh-rlhf pairs (pipeline.data.testing.shortest_real_pairs)."""
    from pipeline.data.testing import shortest_real_pairs as shortest

    return shortest(n, HH_RLHF)
