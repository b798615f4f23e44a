"""Commands run as child processes and measured: wall seconds, CPU seconds and peak resident memory of each
(the child's own rusage from ``os.wait4``), and runs of the same command under an earlier checkout of the
project (``--reference DIR``: a checkout with its own ``.venv``, e.g. `git worktree add --detach DIR COMMIT`
then `make install` there), so a benchmark can put "before" and "after" side by side in one run.

CPU seconds are reported beside wall seconds because the project's machines are shared: on a busy machine
the wall time of a step grows with the load, its CPU time much less.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Linux starts an exec'd child's peak RSS at the peak of the memory it was forked (or vforked) from: a child started
# straight from a benchmark holding torch would report at least the benchmark's own peak. So the command is started
# by this small Python (a few MB), which forks and execs it, reaps it and writes its rusage to a file.
TRAMPOLINE = r"""
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as e:
        print(f"{sys.argv[2]}: {e}", file=sys.stderr)
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"utime": usage.ru_utime, "stime": usage.ru_stime, "maxrss": usage.ru_maxrss}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(cmd: list[str], *, cwd: str | Path | None = None, env: dict | None = None,
                 timeout: float | None = None, log_path: Path | None = None) -> dict:
    """Run ``cmd`` to its end; return its exit status, wall and CPU seconds, its own peak RSS (bytes; started by
    ``TRAMPOLINE``, so the peak is not this process's) and the tail of its output (the whole output goes to
    ``log_path``, a temporary file when not given). A command that runs past ``timeout`` seconds is killed (its
    whole process group) and reported with ``timed_out``."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(log_path) if log_path else Path(tmp) / "output.log"
        usage_file = Path(tmp) / "rusage.json"
        with open(log, "wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", TRAMPOLINE, str(usage_file), *map(str, cmd)], cwd=cwd,
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                while proc.poll() is None:
                    if timeout is not None and time.perf_counter() - t0 > timeout:
                        timed_out = True
                        break
                    time.sleep(0.05)
            finally:  # a timeout, or Ctrl-C: the command and anything it started are stopped, not left running
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            wall = time.perf_counter() - t0
        usage = json.loads(usage_file.read_text()) if usage_file.is_file() else {"utime": 0.0, "stime": 0.0,
                                                                                  "maxrss": 0}
        tail = log.read_bytes()[-4000:].decode(errors="replace")
    return {"cmd": [str(c) for c in cmd], "returncode": proc.returncode, "timed_out": timed_out,
            "wall_seconds": wall, "cpu_seconds": usage["utime"] + usage["stime"],
            "peak_rss_bytes": usage["maxrss"] * 1024, "output_tail": tail}


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
