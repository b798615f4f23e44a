"""`urm extract --engine`: what runs without vLLM installed (the option checks, the install line, `--help` that never
imports vllm, one engine per cache, a reward model's base-model view for vLLM, the GPUs of a torchrun rank, nothing
left by a run that wrote no part). The engine itself is run in tests/test_vllm_extract.py (the vLLM tier)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.configs import ConfigError, ExtractConfig
from pipeline.features.vllm_engine import (EngineError, VllmSettings, base_model_view, engine_arguments, head_names,
                                           pair_waves, rank_gpus, score_head)

ROOT = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lower().startswith("error")]


def test_extract_help_imports_neither_vllm_nor_torch():
    code = ("import sys\nfrom cli import app\ntry:\n    app(['extract', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'vllm' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "--engine" in out.stdout and "LOADED False False" in out.stdout, out.stdout[-500:] + out.stderr[-500:]


def test_an_unknown_engine_is_one_usage_line():
    result = CliRunner().invoke(app, ["extract", "--engine", "sglang", "--preset", "demo"])
    assert result.exit_code == 2
    assert error_lines(result.output) == ["error: --engine must be one of hf, vllm, got 'sglang'"]


@pytest.mark.parametrize("overrides, needle", [
    ({"engine": "vllm", "device": "cuda:1"}, "CUDA_VISIBLE_DEVICES=1"),
    ({"tensor_parallel_size": 0}, "--tensor-parallel-size must be a whole number"),
    ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization must be a fraction"),
])
def test_engine_options_are_checked_before_anything_loads(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        ExtractConfig(**overrides)


@pytest.mark.integration
@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here: the missing-vLLM line cannot show")
def test_engine_vllm_without_vllm_is_one_line_naming_the_install(tmp_path):
    urm = Path(sys.executable).with_name("urm")
    run = subprocess.run([str(urm), "extract", "--preset", "demo", "--engine", "vllm", "--cache-dir",
                          str(tmp_path / "cache"), "ratings"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines() == [error_lines(run.stderr)[0]]
    assert "needs vLLM" in run.stderr and "pip install vllm" in run.stderr
    assert not (tmp_path / "cache").exists()  # at once: no data loaded, nothing written


def test_engine_arguments_follow_the_options_and_the_machine():
    settings = VllmSettings(dtype="bfloat16", max_model_len=4096, max_num_batched_tokens=2048,
                            gpu_memory_utilization=None)
    gpu, cpu = engine_arguments("m", settings, on_cpu=False), engine_arguments("m", settings, on_cpu=True)
    assert gpu["runner"] == "pooling" and gpu["convert"] == "embed" and gpu["dtype"] == "bfloat16"
    assert gpu["gpu_memory_utilization"] == 0.9 and cpu["gpu_memory_utilization"] == 0.1
    assert gpu["enforce_eager"] is False and cpu["enforce_eager"] is True
    assert gpu["enable_prefix_caching"] is True and gpu["max_model_len"] == 4096
    assert gpu["max_num_batched_tokens"] == 4096  # never below the longest row
    mine = VllmSettings("float32", 1024, 8192, 0.5, tensor_parallel_size=2, prefix_caching=False, enforce_eager=False)
    args = engine_arguments("m", mine, on_cpu=True)
    assert (args["gpu_memory_utilization"], args["tensor_parallel_size"], args["enable_prefix_caching"],
            args["enforce_eager"], args["max_num_batched_tokens"]) == (0.5, 2, False, False, 8192)


def test_pairs_go_to_vllm_in_waves_chosen_before_rejected():
    lengths = [100, 120] * 50  # 50 pairs of 110 tokens on average
    order = pair_waves(lengths, budget=550, steps=2)  # waves of 2 x 550 / 110 = 10 pairs
    assert sorted(order) == list(range(100))
    assert order[:20] == list(range(0, 20, 2)) + list(range(1, 20, 2))  # a wave's chosen rows, then its rejected
    position = {row: i for i, row in enumerate(order)}
    assert all(position[2 * i] < position[2 * i + 1] for i in range(50))
    assert pair_waves(lengths, budget=550) == order  # a pure function: a part goes the same way on resume
    assert pair_waves([5, 5, 5], budget=100) == [0, 1, 2] and pair_waves([], budget=10) == []


def test_each_torchrun_rank_takes_its_own_gpus():
    assert rank_gpus(None, 0, 1) == "0" and rank_gpus(None, 3, 2) == "6,7"
    assert rank_gpus("4,5,6,7", 1, 2) == "6,7"
    with pytest.raises(EngineError, match="--nproc-per-node x --tensor-parallel-size"):
        rank_gpus("0,1", 1, 2)


def test_a_reward_model_is_given_to_vllm_as_its_base_model(tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModel, AutoModelForSequenceClassification

    from tiny_models import build_tiny_llama

    monkeypatch.setenv("URM_BACKBONE_CACHE", str(tmp_path / "backbones"))
    model_dir = build_tiny_llama(tmp_path / "rm", reward_model=True)
    view = base_model_view(model_dir, "sha256-sampled:abc")
    assert json.loads((view / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with safe_open(view / "model.safetensors", "pt") as v, safe_open(model_dir / "model.safetensors", "pt") as m:
        assert set(v.keys()) == set(m.keys()) - {"score.weight"}
        assert all(torch.equal(v.get_tensor(k), m.get_tensor(k)) for k in v.keys())
    assert (view / "tokenizer.json").is_symlink()
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    base = AutoModel.from_pretrained(view, dtype=torch.float32)
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    with torch.inference_mode():
        h = base(input_ids=ids).last_hidden_state[:, -1]
        assert torch.allclose(h, reward.model(input_ids=ids).last_hidden_state[:, -1], atol=1e-6)
        assert torch.allclose(score_head(model_dir)(h), reward.score(h))
    written = (view / "model.safetensors").stat().st_mtime_ns
    assert base_model_view(model_dir, "sha256-sampled:abc") == view  # made once
    assert (view / "model.safetensors").stat().st_mtime_ns == written
    assert head_names(["score.weight", "score.bias", "scores.x", "model.score.weight"]) == ["score.bias", "score.weight"]


def test_a_cache_is_refused_to_the_other_engine(tmp_path):
    from pipeline.cache import CacheMismatch, CacheSpec, open_writer
    from pipeline.recipes.extract import refuse_other_engine

    spec = CacheSpec(backbone="b", backbone_revision="r", hidden_size=4, storage_dtype="float32", max_length=8,
                     chat_template_hash="t", dataset="d", dataset_fingerprint="f", kind="ratings",
                     extra={"engine": "vllm", "engine_version": "0.32.0"})
    open_writer(tmp_path / "c", spec, n_parts=1).close()
    with pytest.raises(CacheMismatch, match="was begun with --engine vllm; this run has --engine hf"):
        refuse_other_engine(tmp_path / "c", ExtractConfig(engine="hf"))
    refuse_other_engine(tmp_path / "c", ExtractConfig(engine="hf", overwrite=True))  # --overwrite replaces it
    refuse_other_engine(tmp_path / "none", ExtractConfig(engine="hf"))  # nothing there yet


@pytest.mark.integration
def test_a_run_that_wrote_no_part_leaves_no_cache_folder(tmp_path):
    from pipeline.recipes.extract import run_extract
    from tiny_models import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "tiny")
    (model_dir / "model.safetensors").unlink()  # config and tokenizer open; the weights then fail to load
    cfg = ExtractConfig(backbone=str(model_dir), cache_dir=str(tmp_path / "cache"), device="cpu", dtype="float32",
                        source="synthetic:ratings?n=8&seed=0", kind="ratings", name="ratings")
    with pytest.raises(Exception):
        run_extract(cfg)
    assert not (tmp_path / "cache" / "ratings").exists()
    # a cache that was there before is left as it was
    (tmp_path / "cache" / "ratings").mkdir(parents=True)
    (tmp_path / "cache" / "ratings" / "notes.txt").write_text("mine")
    with pytest.raises(Exception):
        run_extract(cfg)
    assert (tmp_path / "cache" / "ratings" / "notes.txt").read_text() == "mine"
