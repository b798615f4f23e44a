"""bench.measured: a child process's wall and CPU seconds and peak RSS, as the before/after benchmarks read them
(bench full_shape's ratios to the backbone's bytes are these peaks)."""

from __future__ import annotations

import sys

from bench.measured import checkout_commit, run_measured


def test_the_peak_rss_is_the_childs_own_and_a_timeout_kills_it(tmp_path):
    grab = "import numpy as np; a = np.ones(40_000_000); a += 1; print(a.sum())"  # 320 MB, touched
    small = run_measured([sys.executable, "-c", "print(1)"])
    big = run_measured([sys.executable, "-c", grab], log_path=tmp_path / "out.log")
    assert small["returncode"] == big["returncode"] == 0 and big["output_tail"].strip() == "80000000.0"
    assert (tmp_path / "out.log").read_text().strip() == "80000000.0"
    assert big["peak_rss_bytes"] - small["peak_rss_bytes"] > 300e6 and small["peak_rss_bytes"] < 200e6
    assert big["cpu_seconds"] > 0 and big["wall_seconds"] >= big["cpu_seconds"] / 4
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert slow["timed_out"] and slow["returncode"] != 0 and slow["wall_seconds"] < 20


def test_a_checkout_is_named_by_its_commit():
    commit = checkout_commit(None)
    assert commit != "unknown" and len(commit.split("+")[0]) >= 7


def test_the_peak_is_not_the_benchmarks_own():
    """Linux starts an exec'd child's peak at the memory it was forked from: a benchmark holding 400 MB must not
    see a child that prints one number peak there."""
    import numpy as np

    held = np.ones(50_000_000)  # 400 MB, touched
    held += 1
    small = run_measured([sys.executable, "-c", "print(1)"])
    assert small["returncode"] == 0 and small["peak_rss_bytes"] < 100e6 and held[0] == 2
