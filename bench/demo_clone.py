"""`make demo` as a newcomer runs it: a fresh clone of this repository's HEAD in a temporary folder,
then `make demo` there (venv, install, GGUF conversion unless already cached, extract, train-heads,
export, evaluate, the sigmoid example), timed wall-clock; then `make demo` again (the caches reused).

pip's own download cache is used as it is (warm after any earlier install); ``--cold-backbone`` also
moves the converted backbone out of the way (URM_BACKBONE_CACHE set to an empty folder), so the
GGUF conversion is timed too. The output's closing block is kept. Writes bench/results/demo_clone.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench import machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]


def timed_run(command: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, str]:
    t = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t
    text = log.read_text(errors="replace")
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}) in {cwd}; its output: {log}")
    return seconds, text


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench demo_clone")
    ap.add_argument("--cold-backbone", action="store_true", help="convert the GGUF again (empty backbone cache)")
    args = ap.parse_args(argv)
    load_before = machine_info()["load_average"]
    work = Path(tempfile.mkdtemp(prefix="urm-demo-clone-"))
    clone = work / "urm-pipeline"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("URM_", "VIRTUAL_ENV"))}
    if args.cold_backbone:
        env["URM_BACKBONE_CACHE"] = str(work / "backbones")
    first, output = timed_run(["make", "demo"], clone, env, work / "first.log")
    again, _ = timed_run(["make", "demo"], clone, env, work / "again.log")
    closing = output[output.rindex("=" * 100):] if "=" * 100 in output else output[-6000:]
    result = {
        "what": "`make demo` on a fresh clone (install included), then again with the caches in place",
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip(),
        "cold_backbone": args.cold_backbone,
        "fresh_clone_seconds": first, "rerun_seconds": again,
        "closing_output": closing.splitlines(),
        "logs": str(work), "load_average_before": load_before, "machine": machine_info(),
    }
    print(f"fresh clone: make demo {first:.0f} s; rerun {again:.0f} s (logs in {work})")
    print(f"-> {write_result('demo_clone', result)}")
