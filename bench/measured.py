"""Commands run as child processes and measured: wall seconds, CPU seconds and peak resident memory of each
(the child's own rusage from ``os.wait4``), and runs of the same command under an earlier checkout of the
project (``--reference DIR``: a checkout with its own ``.venv``, e.g. `git worktree add --detach DIR COMMIT`
then `make install` there), so a benchmark can put "before" and "after" side by side in one run.

CPU seconds are reported beside wall seconds because the project's machines are shared: on a busy machine
the wall time of a step grows with the load, its CPU time much less.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], *, cwd: str | Path | None = None, env: dict | None = None,
                 timeout: float | None = None, log_path: Path | None = None) -> dict:
    """Run ``cmd`` to its end; return its exit status, wall and CPU seconds, peak RSS (bytes) and the tail of its
    output (the whole output goes to ``log_path``, a temporary file when not given). A command that runs past
    ``timeout`` seconds is killed and reported with ``timed_out``."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(log_path) if log_path else Path(tmp) / "output.log"
        with open(log, "wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
            timed_out = False
            while True:  # reaped here, not by Popen, so that its rusage can be read
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    proc.kill()
                    _, status, usage = os.wait4(proc.pid, 0)
                    timed_out = True
                    break
                time.sleep(0.05)
            wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        tail = log.read_bytes()[-4000:].decode(errors="replace")
    return {"cmd": [str(c) for c in cmd], "returncode": proc.returncode, "timed_out": timed_out,
            "wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "output_tail": tail}


def checkout_python(checkout: str | Path | None) -> Path:
    """The Python of a checkout's own virtual environment (this checkout's when None)."""
    root = Path(checkout) if checkout else ROOT
    python = root / ".venv" / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{root}: no .venv/bin/python; run `make install` there first")
    return python


def checkout_commit(checkout: str | Path | None) -> str:
    """The commit a checkout is at (with "+changes" when its tracked files differ from it)."""
    root = Path(checkout) if checkout else ROOT
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")
