"""An export loads and scores the same in the runtimes users bring: transformers 4.57.x (as under the
installed 5.x) and RewardBench's own reward-model runner.

transformers 4.57.6 lives in .venv-tf457 (pip --target with only transformers, huggingface_hub<1 and
tokenizers; torch and the rest come from .venv) and runs in a subprocess with PYTHONPATH pointing at
it. RewardBench 0.1.4 lives in .venv-rewardbench (its wheel alone: it pins transformers 4.51 and
pulls in vllm-era dependencies, so only its runner's pipeline file, which imports torch alone, is
loaded). `make install` / `make test` build both; skipped with the reason when absent (plain
pytest), failed instead when URM_REQUIRE_COMPAT=1 (as `make test` and so CI set it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.features import render_ids
from tiny_models import (CONVERSATIONS, REWARDBENCH, TF457, TF457_VERSION, build_tiny_llama, export_tiny, require_side_env, require_tf457, scores_here, scores_under, tokenizer_of)

pytestmark = pytest.mark.integration


def with_rope_theta(directory: Path, theta: float) -> Path:
    """Give the saved tiny backbone a non-default RoPE theta (as SmolLM2's 100000 and Llama 3's 500000):
    4.x reads rope_theta, 5.x rope_parameters, and a 4.x load that missed it would silently differ."""
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["rope_parameters"]["rope_theta"] = theta
    config_file.write_text(json.dumps(config, indent=2))
    return directory


def test_export_scores_the_same_under_transformers_457_and_5(tmp_path):
    require_tf457()
    bb = with_rope_theta(build_tiny_llama(tmp_path / "backbone", reward_model=True), 500000.0)
    _, _, out = export_tiny(tmp_path, backbone=bb, members=2, posterior=True)
    ids = render_ids(tokenizer_of(out), CONVERSATIONS)
    old = scores_under(out, CONVERSATIONS, ids, tmp_path, tf457=True)
    new = scores_here(out, CONVERSATIONS, ids)
    assert old["version"] == TF457_VERSION
    assert old["ids"] == pytest.approx(new["ids"], abs=1e-5)
    assert all(e > 0 for e in new["epistemic"]) and old["epistemic"] == pytest.approx(new["epistemic"], rel=1e-5)
    assert old["snippet"] == pytest.approx(new["snippet"], abs=1e-5)
    assert new["snippet"] == pytest.approx(new["ids"], abs=1e-5)  # doubled BOS ignored in both versions


def rewardbench_pipeline_class():
    """RewardBench 0.1.4's RewardBenchPipeline (rewardbench/models/pipeline.py), loaded from its file."""
    file = require_side_env(REWARDBENCH, "rewardbench 0.1.4 (its wheel, --no-deps)") / "rewardbench" / "models" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("rewardbench_pipeline", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RewardBenchPipeline


@pytest.mark.filterwarnings("ignore:`max_length` is ignored:UserWarning")  # the runner's own kwargs
def test_export_scores_the_same_in_rewardbenchs_runner(tmp_path, monkeypatch):
    """RewardBench's default runner for a sequence classifier (its `rewardbench` CLI): the model loaded
    with AutoModelForSequenceClassification and trust_remote_code, chat-templated text tokenised again
    with left padding, a doubled leading BOS masked out by zeroing its mask entry, logits read raw."""
    from transformers import AutoModelForSequenceClassification, BatchEncoding

    pipeline_class = rewardbench_pipeline_class()
    _, _, out = export_tiny(tmp_path, members=2)
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True, device_map="auto",
                                                               dtype=torch.float32)
    tokenizer = tokenizer_of(out)
    tokenizer.padding_side = "left"  # as rewardbench.py sets it
    # The runner sends every batch .to("cuda"); this machine has none, so the batch stays where it is.
    monkeypatch.setattr(BatchEncoding, "to", lambda self, *args, **kwargs: self)
    reward_pipe = pipeline_class("text-classification", model=model, tokenizer=tokenizer)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    kwargs = {"batch_size": 8, "truncation": False, "padding": True, "max_length": 2048,
              "function_to_apply": "none", "return_token_type_ids": False}
    got = reward_pipe(texts, **kwargs).float().cpu().numpy().tolist()
    alone = scores_here(out, CONVERSATIONS, render_ids(tokenizer, CONVERSATIONS))["ids"]
    assert len({len(tokenizer(t)["input_ids"]) for t in texts}) > 1  # padded: the rows differ in length
    assert [g[0] for g in got] == pytest.approx(alone, abs=1e-5)


REFUSAL = r'''
import sys, transformers
from transformers import AutoModelForSequenceClassification
try:
    AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=False)
    print("loaded")
except ValueError as e:
    print("refused", "trust_remote_code=True" in str(e))
'''


def test_under_transformers_457_too_a_load_without_remote_code_is_refused(tmp_path):
    """model_type "urm" under 4.57 as under 5.x: no plain LlamaForSequenceClassification with 2K logits."""
    require_tf457()
    _, _, out = export_tiny(tmp_path, gate_hidden=64)  # the published class named in config.json
    (tmp_path / "refusal.py").write_text(REFUSAL)
    done = subprocess.run([sys.executable, str(tmp_path / "refusal.py"), str(out)], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(TF457), "TRANSFORMERS_VERBOSITY": "error"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "refused True"
