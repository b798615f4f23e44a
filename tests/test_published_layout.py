"""The export in the published URM layout, held against SGLang's contract; checkpoints in that layout (and exports
made before it) read by `urm score`, `urm serve` and `urm evaluate`; TRL's GRPO reward call on an export.

SGLang is not installed here: its wheel installs (`pip install --no-deps sglang==0.5.23`) but its model
package imports its CUDA-only dependencies (orjson, sgl-kernel, flashinfer, ...), so
``LlamaForSequenceClassificationWithNormal_Weights`` cannot be imported on this CPU machine. Its forward and
its loader's rules are written out below from its source:
  python/sglang/srt/models/llama_reward.py (SGLANG_COMMIT of sgl-project/sglang; the same code as the 0.5.23
  wheel, lines 80-140): score = Linear(d, num_labels, bias=False); weights.fc = Linear(d, d) -> SELU ->
  Linear(d, d) -> SELU -> Linear(d, num_labels // 2), all float16, input cast to float16; both applied to
  the hidden states, then last-token pooling; rews = logits.view(-1, K, 2)[:, :, 0]; score = sum(rews * w).
  python/sglang/srt/models/llama.py, LlamaForCausalLM._legacy_load_weights (0.5.23 wheel lines 708-780),
  which LlamaForSequenceClassification.load_weights calls: by name; rotary inv_freq and a tied lm_head are
  skipped; q/k/v and gate/up projections are stacked; a ``.bias`` the model lacks is skipped silently; any
  other name it lacks is logged ("Parameter ... not found in params_dict") and skipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app
from pipeline import ATTRIBUTES
from pipeline.features import render_ids
from pipeline.model import PUBLISHED_ARCHITECTURE
from tiny_models import (CONVERSATIONS, build_published_checkpoint, build_tiny_llama, export_tiny, load_export,
                         tokenizer_of)

pytestmark = pytest.mark.integration
runner = CliRunner()
K = len(ATTRIBUTES)
D = 64  # the tiny backbone's hidden size
SGLANG_REPO = "sgl-project/sglang"
SGLANG_COMMIT = "005da006530a78c9e0c7fb983644a05e194706c0"
STACKED = [(".qkv_proj", ".q_proj"), (".qkv_proj", ".k_proj"), (".qkv_proj", ".v_proj"),
           (".gate_up_proj", ".gate_proj"), (".gate_up_proj", ".up_proj")]  # llama.py's stacked_params_mapping
GATE_NAMES = [f"weights.fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]


# ----------------------------------------------------------------------------------------------
# SGLang's side, from its source


def sglang_reward(tensors: dict, h: torch.Tensor, gate_dtype: torch.dtype) -> torch.Tensor:
    """LlamaForSequenceClassificationWithNormal_Weights.forward on last-token states h [B, d] (its ops are per
    position, so pooling first is the same): the published score in its gate's dtype (float16 in SGLang)."""
    num_labels = tensors["score.weight"].shape[0]
    logits = h @ tensors["score.weight"].to(h.dtype).T  # self.score, no bias
    x = h.to(gate_dtype)  # Weights.forward: self.fc(x.to(torch.float16))
    for i in (0, 2):
        x = F.selu(F.linear(x, tensors[f"weights.fc.{i}.weight"].to(gate_dtype), tensors[f"weights.fc.{i}.bias"].to(gate_dtype)))
    weights = F.linear(x, tensors["weights.fc.4.weight"].to(gate_dtype), tensors["weights.fc.4.bias"].to(gate_dtype))
    rews = logits.view(-1, num_labels // 2, 2)[:, :, 0].view(-1, num_labels // 2)
    return (rews * weights).sum(dim=-1).float()


def sglang_params(backbone_names: set[str], hidden: int, num_labels: int) -> dict[str, tuple]:
    """The parameters of SGLang's class that hold checkpoint tensors: the backbone's (q/k/v and gate/up stacked)
    and the heads', with the heads' shapes."""
    names = set()
    for name in backbone_names:
        for param, shard in STACKED:
            name = name.replace(shard, param)
        names.add(name)
    heads = {"score.weight": (num_labels, hidden), "weights.fc.0.weight": (hidden, hidden), "weights.fc.0.bias": (hidden,),
             "weights.fc.2.weight": (hidden, hidden), "weights.fc.2.bias": (hidden,),
             "weights.fc.4.weight": (num_labels // 2, hidden), "weights.fc.4.bias": (num_labels // 2,)}
    return {**{n: None for n in names}, **heads}


def sglang_target(name: str, params: dict, tied: bool) -> str | None:
    """The parameter _legacy_load_weights loads checkpoint tensor ``name`` into, or None where it skips it."""
    if "rotary_emb.inv_freq" in name or "projector" in name or (tied and "lm_head.weight" in name):
        return None
    for param, shard in STACKED:
        if shard in name:
            name = name.replace(shard, param)
            return name if name in params else None
    return name if name in params else None  # else a ".bias": silently; any other name: logged, skipped


def export_tensors(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(index.values())):
        tensors.update(load_file(str(out / file)))
    return tensors


def last_token_states(model_dir: Path, ids: list[list[int]]) -> torch.Tensor:
    """The backbone's final-norm hidden state at each conversation's last token (what SGLang's pooler reads)."""
    from transformers import LlamaModel

    backbone = LlamaModel.from_pretrained(model_dir, dtype=torch.float32).eval()  # the model.* tensors
    with torch.no_grad():
        return torch.cat([backbone(torch.tensor([x])).last_hidden_state[:, -1] for x in ids])


@pytest.fixture(scope="module")
def published_export(tmp_path_factory):
    """A tiny reward-model backbone, 2-member ensemble and a ridge posterior (extra tensors SGLang must skip) + a URM
    gate as wide as the backbone (the published shape), exported."""
    return export_tiny(tmp_path_factory.mktemp("published"), reward_model=True, members=2, gate_hidden=D, posterior=True)


# ----------------------------------------------------------------------------------------------
# The export, in the published layout


def test_the_export_is_laid_out_as_the_published_urm(published_export):
    _, _, out = published_export
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [PUBLISHED_ARCHITECTURE] and len(config["id2label"]) == 2 * K
    tensors = export_tensors(out)
    assert tensors["score.weight"].shape == (2 * K, D)
    assert {n: tuple(tensors[n].shape) for n in GATE_NAMES} == {
        "weights.fc.0.weight": (D, D), "weights.fc.0.bias": (D,), "weights.fc.2.weight": (D, D),
        "weights.fc.2.bias": (D,), "weights.fc.4.weight": (K, D), "weights.fc.4.bias": (K,)}
    card = (out / "README.md").read_text()
    assert PUBLISHED_ARCHITECTURE in card and "--is-embedding --trust-remote-code" in card
    assert "`ensemble.weight`, `posterior.*`, `base_score.*`" in card  # what SGLang skips, named
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: text-classification" in front


def test_sglangs_loader_fills_every_parameter_and_skips_only_our_extra_tensors(published_export):
    _, _, out = published_export
    tensors, config = export_tensors(out), json.loads((out / "config.json").read_text())
    backbone = {n for n in tensors if n.startswith("model.")}
    params = sglang_params(backbone, config["hidden_size"], len(config["id2label"]))
    loaded = {}
    for name, tensor in tensors.items():
        target = sglang_target(name, params, config["tie_word_embeddings"])
        if target is not None:
            loaded.setdefault(target, []).append(tensor)
    assert set(loaded) == set(params)  # nothing left uninitialised
    for name, shape in params.items():
        if shape is not None:  # default_weight_loader asserts equal sizes
            assert [tuple(t.shape) for t in loaded[name]] == [shape], name
    skipped = {n for n in tensors if sglang_target(n, params, config["tie_word_embeddings"]) is None}
    assert skipped == {"ensemble.weight", "base_score.weight"} | {n for n in tensors if n.startswith("posterior.")}
    assert {n.split(".")[-1] for n in skipped if n.startswith("posterior.")} == {
        "basis", "shrink", "outside", "noise", "center", "direction", "column"}


def test_sglangs_forward_on_the_export_equals_its_reward(published_export):
    """SGLang's math on the export's tensors and the backbone's last-token state: equal to logits[:, 0] in fp32;
    with SGLang's float16 gate, the gap printed (and bounded)."""
    _, _, out = published_export
    ids = render_ids(tokenizer_of(out), CONVERSATIONS)
    tensors, h = export_tensors(out), last_token_states(out, ids)
    model = load_export(out)
    with torch.no_grad():
        ours = torch.stack([model(torch.tensor([x])).logits[0, 0] for x in ids])
    fp32 = sglang_reward(tensors, h, torch.float32)
    fp16 = sglang_reward(tensors, h, torch.float16)
    torch.testing.assert_close(fp32, ours, atol=1e-5, rtol=0)
    gap = (fp16 - ours).abs().max().item()
    print(f"SGLang's fp16 gate vs our fp32 gate (tiny export): max |gap| {gap:.3g} on scores up to "
          f"{ours.abs().max().item():.3g}")
    assert 0 < gap < 1e-2 * (1 + ours.abs().max().item())  # float16 rounding: visible, small


def test_without_remote_code_transformers_refuses_where_a_plain_llama_would_score_wrong(published_export):
    """The trap the model_type guards against: LlamaForSequenceClassification (what the Auto class would build for
    model_type llama) loads score.weight [2K, d] as 2K logits, the first helpfulness's mean, not the reward."""
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        LlamaForSequenceClassification,
    )

    _, _, out = published_export
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=False)
    plain = LlamaForSequenceClassification.from_pretrained(out).eval()  # only when named by hand
    ours = load_export(out)
    # without the closing EOS (= pad here, where the plain class would stop reading) both read the last token
    x = torch.tensor([render_ids(tokenizer_of(out), CONVERSATIONS[:1])[0][:-1]])
    with torch.no_grad():
        wrong, right = plain(x).logits, ours(x)
    assert wrong.shape == (1, 2 * K)
    torch.testing.assert_close(wrong[0, 0], right.attribute_means[0, 0], atol=1e-5, rtol=0)
    assert abs(wrong[0, 0] - right.logits[0, 0]) > 1e-3
    # SGLang reads the config through AutoConfig (its hf parser): with --trust-remote-code our URMConfig, which has
    # what its class takes; without, the same refusal (SGLang does not start)
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert config.architectures == [PUBLISHED_ARCHITECTURE] and config.num_labels == 2 * K and config.hidden_size == D
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoConfig.from_pretrained(out, trust_remote_code=False)


def test_the_published_gate_in_float16_through_our_model(published_export):
    """Our model with its gate cast to float16 (as SGLang runs it): the same gap as SGLang's math gives."""
    _, _, out = published_export
    ids = render_ids(tokenizer_of(out), CONVERSATIONS)
    model = load_export(out)
    with torch.no_grad():
        ours = torch.stack([model(torch.tensor([x])).logits[0, 0] for x in ids])
        h = last_token_states(out, ids)
        gate16 = model.weights.half()
        w = gate16(h.half()).float()
        mu = model.score(h)[:, 0::2]
        fp16 = (w * mu).sum(-1)
    torch.testing.assert_close(fp16, sglang_reward(export_tensors(out), h, torch.float16), atol=1e-5, rtol=0)
    print(f"our model, gate in float16: max |gap| {(fp16 - ours).abs().max().item():.3g}")


def test_an_export_whose_heads_sglang_cannot_compute_does_not_name_its_class(tmp_path):
    """A narrower gate (Weights is Linear(d, d)) or a value-head bias (its score has none and its loader drops
    score.bias silently): our own architecture, which SGLang refuses."""
    for kw in ({"gate_hidden": 16}, {"gate_hidden": D, "bias": True}, {"gate": "softmax"}):
        _, _, out = export_tiny(tmp_path / str(len(list(tmp_path.iterdir()))), **kw)
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["URMForSequenceClassification"], kw
        assert "does not serve" in (out / "README.md").read_text()


# ----------------------------------------------------------------------------------------------
# A checkpoint in the published layout (shaped like LxzGordon/URM-LLaMa-3.1-8B), read by our commands


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return build_published_checkpoint(tmp_path_factory.mktemp("lxz") / "URM-tiny")


def expected_published(directory: Path, conversations) -> torch.Tensor:
    ids = render_ids(tokenizer_of(directory), conversations)
    return sglang_reward(load_file(str(directory / "model.safetensors")), last_token_states(directory, ids), torch.float32)


def test_urm_score_reads_a_published_checkpoint_with_sigma_and_gate_weights(published, tmp_path):
    config = json.loads((published / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == [PUBLISHED_ARCHITECTURE]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": str(i), "messages": c}) + "\n" for i, c in enumerate(CONVERSATIONS)))
    result = runner.invoke(app, ["score", str(published), "--input", str(rows), "--device", "cpu", "--dtype",
                                 "float32"])
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["score"] for r in got] == pytest.approx(expected_published(published, CONVERSATIONS).tolist(), abs=1e-5)
    for row in got:
        assert set(row["attribute_stds"]) == set(ATTRIBUTES) and set(row["gating_weights"]) == set(ATTRIBUTES)
        assert row["score_std"] > 0 and row["sigma_calibrated"] is False
    assert "never calibrated" in result.stderr


def damaged_copy(published: Path, where: Path, change) -> Path:
    """A copy of the checkpoint with ``change(tensors, config)`` applied to its weights and config.json."""
    shutil.copytree(published, where)
    tensors = load_file(str(where / "model.safetensors"))
    config = json.loads((where / "config.json").read_text())
    change(tensors, config)
    save_file(tensors, str(where / "model.safetensors"), metadata={"format": "pt"})
    (where / "config.json").write_text(json.dumps(config))
    return where


def relabelled(config: dict, n: int) -> None:
    config["num_labels"] = n
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(n)}


@pytest.mark.parametrize("name, change, says", [
    ("no-gate-bias", lambda t, c: t.pop("weights.fc.4.bias"), "weights.fc.4.bias not in its weight files"),
    ("no-layer", lambda t, c: t.pop("model.layers.1.mlp.down_proj.weight"),
     "model.layers.1.mlp.down_proj.weight not in its weight files"),
    ("nan-score", lambda t, c: t["score.weight"].__setitem__((3, 5), float("nan")),
     "score.weight in model.safetensors holds NaN or infinite values"),
    ("inf-gate", lambda t, c: t["weights.fc.2.weight"].__setitem__((0, 0), float("inf")),
     "weights.fc.2.weight in model.safetensors holds NaN or infinite values"),
    ("wide-score", lambda t, c: t.__setitem__("score.weight", torch.zeros(2 * K, 2 * D)),
     f"score.weight in model.safetensors has shape [{2 * K}, {2 * D}], but config.json makes it [{2 * K}, {D}]"),
    ("labels", lambda t, c: relabelled(c, 2 * K + 2),
     f"score.weight in model.safetensors has shape [{2 * K}, {D}], but config.json makes it [{2 * K + 2}, {D}]"),
    ("nan-backbone", lambda t, c: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((1, 1), float("nan")),
     "its weight model.layers.0.self_attn.q_proj.weight holds NaN or infinite values"),
])
def test_a_damaged_published_checkpoint_is_refused_in_one_line_never_scored(published, tmp_path, name, change, says):
    """Every tensor the class needs must be in the files with its shape, and finite: transformers would fill a
    missing gate bias with random numbers and score with it (exit 0), and report shapes in its own table."""
    damaged = damaged_copy(published, tmp_path / name, change)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    for command in (["score", str(damaged), "-i", str(rows), "-o", str(tmp_path / "s.jsonl")],
                    ["curate", str(damaged), "-i", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "c")]):
        if command[0] == "curate":
            (tmp_path / "p.jsonl").write_text("".join(json.dumps({"chosen": c, "rejected": c[:-1] + [
                {"role": "assistant", "content": "no"}]}) + "\n" for c in CONVERSATIONS))
        result = runner.invoke(app, [*command, "--device", "cpu"])
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
        assert says in errors[0] and str(damaged) in errors[0], errors[0]
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "c").exists()
    if name in ("no-gate-bias", "nan-score", "wide-score", "labels"):  # evaluate reads the heads the same way
        from pipeline.model import HeadsError, published_heads

        with pytest.raises(HeadsError, match=says.split(" in model")[0].split(" has shape")[0]):
            published_heads(damaged)


def test_urm_serve_loads_a_published_checkpoint(published):
    from pipeline.configs import ServeConfig
    from pipeline.serve import load_service

    service = load_service(str(published), ServeConfig(device="cpu", dtype="float32"))
    assert service.info["layout"] == "published" and service.info["sigma_calibrated"] is False
    out = service.score_fn(service.encode_conversations(CONVERSATIONS))
    assert out["score"].tolist() == pytest.approx(expected_published(published, CONVERSATIONS).tolist(), abs=1e-5)
    assert out["attribute_stds"].shape == (len(CONVERSATIONS), K)


def test_urm_evaluate_reads_a_published_checkpoint_on_caches_it_extracted(published, tmp_path):
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["extract", "--backbone", str(published), "--cache-dir", str(cache), "--source",
                                 "synthetic:preferences?n=6&seed=3", "--kind", "preferences", "--name", "pairs",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["extract", "--backbone", str(published), "--cache-dir", str(cache), "--source",
                                 "synthetic:ratings?n=8&seed=4", "--kind", "ratings", "--name", "ratings",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    caches = ["--eval-preferences", str(cache / "pairs"), "--eval-ratings", str(cache / "ratings"), "--device", "cpu"]
    refused = runner.invoke(app, ["evaluate", str(published), *caches, "--report-dir", str(tmp_path / "r0")])
    assert refused.exit_code == 1 and "--no-baselines" in refused.output and "Traceback" not in refused.output
    result = runner.invoke(app, ["evaluate", str(published), "--no-baselines", *caches, "--report-dir",
                                 str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    main = report["models"][0]
    assert "sigma never calibrated" in main["about"]
    assert {"coverage90", "nll"} <= set(main["attributes"])  # its sigma, checked against held-out labels
    from pipeline.cache import read_pairs

    pairs = read_pairs(cache / "pairs")
    tensors = load_file(str(published / "model.safetensors"))
    s_c = sglang_reward(tensors, pairs.chosen.embedding.float(), torch.float32)
    s_r = sglang_reward(tensors, pairs.rejected.embedding.float(), torch.float32)
    assert main["pairs"]["pairs"]["accuracy"] == pytest.approx((s_c > s_r).double().mean().item())


# ----------------------------------------------------------------------------------------------
# An export made before this layout (gate weights.{0,2,4}.*, model_type llama, one label) still loads


def as_old_export(out: Path, old: Path) -> Path:
    """``out`` rewritten as `urm export` wrote it before the published layout, checksums and all."""
    import xxhash

    shutil.copytree(out, old)
    rename = {n: n.replace("weights.fc.", "weights.") for n in load_file(str(old / "urm-heads.safetensors"))}
    tensors = {rename[n]: t for n, t in load_file(str(old / "urm-heads.safetensors")).items()}
    save_file(tensors, str(old / "urm-heads.safetensors"), metadata={"format": "pt"})
    index = json.loads((old / "model.safetensors.index.json").read_text())
    index["weight_map"] = {rename.get(n, n): f for n, f in index["weight_map"].items()}
    (old / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((old / "config.json").read_text())
    config.update(model_type="llama", architectures=["URMForSequenceClassification"], id2label={"0": "score"},
                  label2id={"score": 0})
    for key in ("backbone_model_type", "sigma_calibrated"):
        config["urm"].pop(key)
    config["urm"]["format_version"] = 1
    (old / "config.json").write_text(json.dumps(config))
    digest = lambda p: xxhash.xxh3_128(p.read_bytes()).hexdigest()
    meta = json.loads((old / "heads.json").read_text())
    meta["checksum"] = digest(old / "urm-heads.safetensors")
    (old / "heads.json").write_text(json.dumps(meta))
    record = json.loads((old / "urm_export.json").read_text())
    record["checksums"] = {n: digest(old / n) for n in record["checksums"]}
    (old / "urm_export.json").write_text(json.dumps(record))
    return old


def test_an_export_made_before_the_published_layout_scores_and_evaluates_the_same(published_export, tmp_path):
    from pipeline.features import checkpoint_identity
    from pipeline.model import load_for_evaluation
    from pipeline.serve import load_scorer

    _, _, out = published_export
    old = as_old_export(out, tmp_path / "old")
    assert "weights.0.weight" in load_file(str(old / "urm-heads.safetensors"))
    ids = render_ids(tokenizer_of(out), CONVERSATIONS)
    scores = {}
    for name, directory in (("new", out), ("old", old)):
        model, _ = load_scorer(str(directory), device="cpu")
        with torch.no_grad():
            scores[name] = torch.stack([model(torch.tensor([x])).score_std[0] for x in ids] +
                                       [model(torch.tensor([x])).logits[0, 0] for x in ids])
        heads, _, _ = load_for_evaluation(str(directory), checkpoint_identity)
        scores[name + " heads"] = heads(last_token_states(out, ids))["score"]
    torch.testing.assert_close(scores["old"], scores["new"], atol=0, rtol=0)
    torch.testing.assert_close(scores["old heads"], scores["new heads"], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# TRL: GRPOTrainer with the export as its reward model


def test_trl_grpo_rewards_equal_urm_score(published_export, tmp_path):
    """TRL's GRPOTrainer given the export's path in reward_funcs (loaded with AutoModelForSequenceClassification,
    trust_remote_code=True): its _calculate_rewards (chat template, right padding, logits[:, 0]) equals `urm score`."""
    trl = pytest.importorskip("trl", reason="trl is in the test extras (pip install -e '.[test]'); not installed here")
    from datasets import Dataset

    from pipeline.serve import load_scorer, score_ids

    _, _, out = published_export
    policy = build_tiny_llama(tmp_path / "policy")  # a causal LM to train (not run here)
    prompts = [c[:-1] for c in CONVERSATIONS]
    completions = [c[-1:] for c in CONVERSATIONS]
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=3, num_generations=3,
                          max_completion_length=4, report_to="none", use_cpu=True, trust_remote_code=True,
                          bf16=False, logging_steps=1)
    trainer = trl.GRPOTrainer(model=str(policy), reward_funcs=str(out), args=args,
                              train_dataset=Dataset.from_dict({"prompt": prompts}))
    inputs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    rewards = trainer._calculate_rewards(inputs, prompts, completions, [[0]] * len(prompts))
    model, tokenizer = load_scorer(str(out), "float32", device="cpu")
    expected = score_ids(model, render_ids(tokenizer, CONVERSATIONS), 4096, tokenizer.pad_token_id)["score"]
    assert rewards[:, 0].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
