"""Benchmarks: `python -m bench` (or `make bench`) runs every module in bench.__main__.BENCHES;
`python -m bench NAME` runs one. Each writes its figures to bench/results/NAME.json."""

import json
import os
import platform
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
    """Write bench/results/NAME.json atomically (temporary file, then rename)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    final = RESULTS / f"{name}.json"
    tmp = RESULTS / f"{name}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, final)
    return final
