"""The fuzz test: several hundred seeded bad inputs against the CLI (tests/fuzz_cli.py), in a subprocess.

Every case must end with a non-zero exit, no traceback and one error line naming the problem, leave no
output behind, and no command may exit 0 having used corrupt data (or data without signal, a cache of the
wrong kind, a manifest that disagrees with its parts); a damaged cache part must be rebuilt by `urm extract`;
a training killed at any step of a heads save leaves heads that load (old or new), a second training into a
folder in use is refused at once, and a full disk is named as such; an output that names an input or a place
the user's files are is refused with every file as it was, and so are a blank API key, a damaged published
checkpoint, a cache whose source changed and an export while a training writes the heads. A sample of the cases also runs through
the real `urm` entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).with_name("fuzz_cli.py")
SMALLEST = {"data": 100, "cache": 80, "repair": 3, "heads": 40, "export": 60, "preset": 20, "option": 150,
            "nosignal": 30, "kind": 24, "layout": 30, "bom": 15, "missing": 20, "curate": 30}
SMALLEST_WRITES = {"kill": 8, "writers": 3, "disk": 10}  # heads saves killed, two writers, a full disk
SMALLEST_OUTPUTS = {"outputs": 40, "oddplace": 8, "keys": 10, "checkpoint": 20, "stale": 14, "cachename": 12,
                    "exporting": 4}  # issue 27: the output rule, keys, published checkpoints, stale caches, export


@pytest.mark.integration
def test_bad_inputs_end_in_one_clear_line_and_nothing_corrupt_is_used(tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(FUZZER), str(tmp_path / "work"), "--seed", "0", "--processes", "24",
                           "--report", str(report)], capture_output=True, text=True, timeout=2400)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-3000:]
    print(summary)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["failed"] == {} and result["cases"] >= 500, summary
    assert all(result["counts"].get(kind, 0) >= n for kind, n in SMALLEST.items()), result["counts"]
    assert all(result["counts"].get(kind, 0) >= n for kind, n in SMALLEST_WRITES.items()), result["counts"]
    assert all(result["counts"].get(kind, 0) >= n for kind, n in SMALLEST_OUTPUTS.items()), result["counts"]
    assert result["as_process"] == 24
    for case in result["results"]:  # the judge saw what it claims: one error line per failed command
        if case["kind"] != "repair":
            assert case["exit"] != 0 and not case["problems"]
