"""An export loads with trust_remote_code under transformers 4.57.x as under the installed 5.x, with equal scores.

transformers 4.57.6 lives in .venv-tf457 (`make install` / `make test` build it: pip --target with only
transformers, huggingface_hub<1 and tokenizers; torch and the rest come from .venv), and runs in a
subprocess with PYTHONPATH pointing at it. Skipped with the reason when that folder is absent (plain
pytest), failed instead when URM_REQUIRE_TF457=1 (as `make test` and so CI set it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.render import render_ids
from test_export import CONVERSATIONS, export_tiny, load_export, tokenizer_of
from tiny_models import build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TF457 = ROOT / ".venv-tf457"
TF457_VERSION = "4.57.6"

# Scores under whatever transformers is importable: the rendered ids as given, and the seed snippet's
# way (templated text tokenised again, so a second BOS where the tokenizer adds one).
SCRIPT = r'''
import json, sys, torch, transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model_dir, inputs = sys.argv[1], json.loads(open(sys.argv[2]).read())
model = AutoModelForSequenceClassification.from_pretrained(model_dir, device_map="auto", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
with torch.no_grad():
    ids = [model(torch.tensor([x], device=model.device)).logits[0][0].item() for x in inputs["ids"]]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in inputs["conversations"]]
    snippet = [model(**tokenizer(t, return_tensors="pt").to(model.device)).logits[0][0].item() for t in texts]
print(json.dumps({"version": transformers.__version__, "ids": ids, "snippet": snippet}))
'''


def require_tf457() -> Path:
    """The 4.57 environment, or a skip (a plain pytest run) / a failure (URM_REQUIRE_TF457=1, as in CI)."""
    ok = (TF457 / "transformers" / "__init__.py").is_file()
    if not ok:
        reason = (f"{TF457} not found: transformers {TF457_VERSION} is installed there by `make install` "
                  "(or `make test`), which CI runs")
        if os.environ.get("URM_REQUIRE_TF457") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return TF457


def scores_under(model_dir: Path, conversations, ids, tmp_path: Path, tf457: bool = True) -> dict:
    """Run SCRIPT in a fresh interpreter, under transformers 4.57 (tf457) or the installed 5.x."""
    (tmp_path / "score_script.py").write_text(SCRIPT)
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"conversations": conversations, "ids": ids}))
    env = {**os.environ, "PYTHONPATH": str(require_tf457()) if tf457 else "", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, str(tmp_path / "score_script.py"), str(model_dir), str(inputs)],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def with_rope_theta(directory: Path, theta: float) -> Path:
    """Give the saved tiny backbone a non-default RoPE theta (as SmolLM2's 100000 and Llama 3's 500000):
    4.x reads rope_theta, 5.x rope_parameters, and a 4.x load that missed it would silently differ."""
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["rope_parameters"]["rope_theta"] = theta
    config_file.write_text(json.dumps(config, indent=2))
    return directory


def scores_here(model_dir: Path, conversations, ids) -> dict:
    """SCRIPT's numbers under the installed transformers 5.x, in this process."""
    model, tokenizer = load_export(model_dir), tokenizer_of(model_dir)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    with torch.no_grad():
        return {"ids": [model(torch.tensor([x])).logits[0][0].item() for x in ids],
                "snippet": [model(**tokenizer(t, return_tensors="pt")).logits[0][0].item() for t in texts]}


def test_export_scores_the_same_under_transformers_457_and_5(tmp_path):
    require_tf457()
    bb = with_rope_theta(build_tiny_llama(tmp_path / "backbone", reward_model=True), 500000.0)
    _, _, out = export_tiny(tmp_path, backbone=bb, members=2)
    ids = render_ids(tokenizer_of(out), CONVERSATIONS)
    old = scores_under(out, CONVERSATIONS, ids, tmp_path, tf457=True)
    new = scores_here(out, CONVERSATIONS, ids)
    assert old["version"] == TF457_VERSION
    assert old["ids"] == pytest.approx(new["ids"], abs=1e-5)
    assert old["snippet"] == pytest.approx(new["snippet"], abs=1e-5)
    assert new["snippet"] == pytest.approx(new["ids"], abs=1e-5)  # doubled BOS ignored in both versions
