"""`urm export` on tiny random Llamas: the export loads with AutoModelForSequenceClassification, its weights are
the heads' and the backbone's bit for bit (shards hardlinked or, where they must be, rewritten), and it
scores like the heads on the backbone's hidden state whatever the padding, holes or doubled BOS."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from pipeline import ATTRIBUTES
from pipeline.configs import ExportConfig
from pipeline.export import ExportError
from pipeline.features import embed_all, load_backbone, render_ids
from pipeline.model import load_heads
from pipeline.outputs import OutputRefused
from pipeline.recipes.export import export_model
from tiny_models import (CONVERSATIONS, build_tiny_llama, cache_identity_of, export_tiny, load_export,
                         random_heads_dir, tokenizer_of)

pytestmark = pytest.mark.integration  # every test exports (and loads) a model
K = len(ATTRIBUTES)


def expected_from_heads(backbone_dir: Path, heads_dir: Path, conversations) -> dict:
    """The training path: extraction's hidden states (pipeline.features.embedding) through pipeline.model.heads.Heads."""
    backbone = load_backbone(str(backbone_dir), dtype="float32", device="cpu")
    h, base = embed_all(backbone, render_ids(backbone.tokenizer, conversations), max_tokens=4096)
    heads, _ = load_heads(heads_dir)
    with torch.no_grad():
        out = heads(torch.from_numpy(h))
    return {**out, "base_score": None if base is None else torch.from_numpy(base)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny causal-LM backbone with a 3-member ensemble + URM gate + a ridge posterior, exported."""
    return export_tiny(tmp_path_factory.mktemp("export"), members=3, posterior=True)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load_export(tiny[2])


# ----------------------------------------------------------------------------------------------
# What the export holds


def test_export_directory_holds_code_config_weights_tokenizer_and_card(tiny):
    bb, heads_dir, out = tiny
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "modeling_urm.py", "heads.py", "configuration_urm.py", "model.safetensors.index.json", "model-backbone.safetensors",
                     "urm-heads.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "README.md", "heads.json", "urm_export.json"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_urm.URMConfig",
                                  "AutoModelForSequenceClassification": "modeling_urm.URMForSequenceClassification"}
    assert config["model_type"] == "urm" and config["urm"]["backbone_model_type"] == "llama"
    assert config["urm"]["attributes"] == list(ATTRIBUTES) and len(config["id2label"]) == 2 * K
    assert config["architectures"] == ["URMForSequenceClassification"]  # a 16-wide gate: not SGLang's class
    assert config["urm"]["members"] == 3 and config["urm"]["gate"] == "urm"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["score.weight"] == index["ensemble.weight"] == "urm-heads.safetensors"
    assert index["model.norm.weight"] == "model-backbone.safetensors"
    # The backbone's file is reused, not written: same inode (a hardlink).
    assert os.stat(out / "model-backbone.safetensors").st_ino == os.stat(bb / "model.safetensors").st_ino
    card = (out / "README.md").read_text()
    assert all(name in card for name in ATTRIBUTES) and f'model_name = "{out}"' in card
    assert "fp-tiny" in card and "score_std" in card  # cache fingerprint, uncertainty outputs
    record = json.loads((out / "urm_export.json").read_text())
    assert record["shards"] == {"model-backbone.safetensors": "linked"}
    import xxhash  # every weight file's checksum, for `urm score` to verify
    assert record["checksums"] == {p.name: xxhash.xxh3_128(p.read_bytes()).hexdigest() for p in out.iterdir()
                                   if p.name not in ("README.md", "urm_export.json")}
    assert {"model-backbone.safetensors", "urm-heads.safetensors", "config.json", "tokenizer.json"} <= set(
        record["checksums"])


def test_weights_are_bit_identical_to_the_heads_and_the_backbone(tiny):
    bb, heads_dir, out = tiny
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    heads = load_file(str(heads_dir / "heads.safetensors"))
    backbone = load_file(str(bb / "model.safetensors"))
    assert heads and all(torch.equal(state[k], v) for k, v in heads.items())
    backbone_keys = [k for k in backbone if k.startswith("model.")]
    assert len(backbone_keys) > 10 and all(torch.equal(state[k], backbone[k]) for k in backbone_keys)
    assert set(state) == set(heads) | set(backbone_keys)


def test_scores_equal_the_heads_on_the_extracted_hidden_state(tiny, tiny_model):
    bb, heads_dir, out = tiny
    expected = expected_from_heads(bb, heads_dir, CONVERSATIONS)
    tok = tokenizer_of(out)
    for i, ids in enumerate(render_ids(tok, CONVERSATIONS)):
        with torch.no_grad():
            got = tiny_model(torch.tensor([ids]))
        torch.testing.assert_close(got.logits[0, 0], expected["score"][i], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.score_std[0], expected["score_std"][i], atol=1e-5, rtol=1e-5)
        for name in ("attribute_means", "attribute_stds", "gating_weights", "ensemble_scores", "ensemble_std",
                     "epistemic_std", "attribute_epistemic_stds"):
            torch.testing.assert_close(getattr(got, name)[0], expected[name][i], atol=1e-5, rtol=1e-5)
        assert got.epistemic_std[0] > 0 and got.attribute_epistemic_stds.shape == (1, K)
        assert got.ensemble_scores.shape == (1, 3) and got.base_score is None


def test_in_bf16_the_backbone_runs_bf16_and_the_heads_stay_fp32(tiny):
    """A bf16 load (GPU default, auto-bf16 on CPUs with native bf16) keeps the heads in fp32: their output is
    the fp32 heads on the bf16 backbone's hidden state, not bf16-rounded (where close answers tie exactly)."""
    from transformers import AutoModelForSequenceClassification

    _, heads_dir, out = tiny
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
    heads_params = {n: p.dtype for n, p in [*model.named_parameters(), *model.named_buffers()]
                    if not n.startswith("model.")}
    assert any(n.startswith("posterior.") for n in heads_params)
    assert heads_params and set(heads_params.values()) == {torch.float32}, heads_params
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    heads, _ = load_heads(heads_dir)
    ids = torch.tensor([render_ids(tokenizer_of(out), CONVERSATIONS[:1])[0]])
    with torch.no_grad():
        got = model(ids)
        h = model.model(input_ids=ids).last_hidden_state[:, -1]
        expected = heads(h.float())
    torch.testing.assert_close(got.logits[0, 0], expected["score"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.score_std[0], expected["score_std"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.epistemic_std[0], expected["epistemic_std"][0], atol=1e-6, rtol=1e-6)


def test_padding_side_holes_and_doubled_bos_do_not_change_the_score(tiny, tiny_model):
    tok = tokenizer_of(tiny[2])
    bos, pad = tok.bos_token_id, tok.pad_token_id
    ids = render_ids(tok, CONVERSATIONS)
    assert all(x[0] == bos and x[1] != bos for x in ids)  # one BOS, as rendered
    with torch.no_grad():
        single = torch.stack([tiny_model(torch.tensor([x])).logits[0, 0] for x in ids])

        def batch(rows, left: bool, hole_at_first: bool = False):
            width = max(map(len, rows)) + 2
            x, mask = torch.full((len(rows), width), pad), torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                span = slice(width - len(r), width) if left else slice(0, len(r))
                x[i, span], mask[i, span] = torch.tensor(r), 1
                if hole_at_first:
                    mask[i, span.start] = 0
            return tiny_model(x, attention_mask=mask).logits[:, 0]

        doubled = [[bos] + x for x in ids]
        cases = {"right padding": batch(ids, left=False), "left padding": batch(ids, left=True),
                 # RewardBench: a doubled BOS masked out by zeroing its mask entry -> a hole after left padding
                 "hole (left)": batch(doubled, left=True, hole_at_first=True),
                 "hole (right)": batch(doubled, left=False, hole_at_first=True),
                 "double BOS": torch.stack([tiny_model(torch.tensor([x])).logits[0, 0] for x in doubled]),
                 "triple BOS, left padded": batch([[bos, bos] + x for x in ids], left=True)}
    for name, got in cases.items():
        torch.testing.assert_close(got, single, atol=1e-5, rtol=0, msg=name)


def test_the_exported_code_imports_only_torch_transformers_and_its_siblings(tiny):
    """The export ships the package's own heads.py (the one scoring module) beside modeling_urm.py."""
    import ast

    from pipeline.export import CODE_FILES

    out, package = tiny[2], Path(__file__).parents[1] / "pipeline" / "model"
    allowed = {"modeling_urm.py": ({"torch", "transformers", "dataclasses", "typing"}, {"configuration_urm", "heads"}),
               "heads.py": ({"torch", "math", "__future__"}, set()),
               "configuration_urm.py": ({"transformers"}, set())}
    assert set(CODE_FILES) == set(allowed)
    for name, (roots_allowed, siblings_allowed) in allowed.items():
        code = (out / name).read_text()
        if name != "configuration_urm.py":  # that one gets the backbone's config class written in
            assert code == (package / name).read_text(), name
        tree = ast.parse(code)
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        siblings = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert roots <= roots_allowed, (name, roots)
        assert siblings <= siblings_allowed, (name, siblings)


def test_without_remote_code_loading_is_an_error_and_with_it_urm_config(tiny):
    """model_type "urm" (unknown to transformers): AutoConfig and AutoModelForSequenceClassification without
    trust_remote_code stop and ask for it, rather than build a plain LlamaForSequenceClassification that would
    read the [2K, d] value head as 2K logits (the first: helpfulness's mean, a wrong reward). The tokenizer
    loads without it (its class is in tokenizer_config.json)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    out = tiny[2]
    for load in (AutoConfig.from_pretrained, AutoModelForSequenceClassification.from_pretrained):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            load(out, trust_remote_code=False)
    remote = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == "URMConfig" and isinstance(remote, LlamaConfig) and remote.model_type == "urm"
    assert remote.urm["members"] == 3 and remote.num_labels == 2 * K and remote.id2label[0] == "score"
    assert "from transformers import LlamaConfig as BackboneConfig" in (out / "configuration_urm.py").read_text()
    AutoTokenizer.from_pretrained(out, trust_remote_code=False)


def test_return_dict_false_gives_a_tuple_starting_with_the_logits(tiny_model):
    x = torch.tensor([[0, 5, 6, 7, 1]])
    with torch.no_grad():
        as_dict, as_tuple = tiny_model(x), tiny_model(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.logits)
    assert as_dict.logits.shape == (1, 1)
    assert len(as_tuple) == 9  # logits, score_std, means, stds, weights, ensemble_scores, ensemble_std, epistemic x2
    assert torch.equal(as_tuple[7], as_dict.epistemic_std)  # after the outputs exports had before it


def test_text_classification_pipeline_returns_the_score(tiny, tiny_model):
    from transformers import pipeline

    out = tiny[2]
    tok = tokenizer_of(out)
    text = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    classify = pipeline("text-classification", model=str(out), trust_remote_code=True)
    got = classify(text, function_to_apply="none")[0]
    with torch.no_grad():
        enc = tok(text, return_tensors="pt")  # adds a second BOS: the guard drops it
        expected = tiny_model(**enc).logits[0][0].item()
    assert got["label"] == "score" and got["score"] == pytest.approx(expected, abs=1e-5)


def test_reward_model_backbone_keeps_its_own_head_as_base_score(tmp_path):
    bb, heads_dir, out = export_tiny(tmp_path, reward_model=True)
    assert json.loads((out / "urm_export.json").read_text())["shards"] == {"model-backbone.safetensors": "rewritten"}
    model = load_export(out)
    original = load_file(str(bb / "model.safetensors"))
    assert torch.equal(model.base_score.weight, original["score.weight"])  # renamed, bit-identical
    assert torch.equal(model.score.weight, load_file(str(heads_dir / "heads.safetensors"))["score.weight"])
    expected = expected_from_heads(bb, heads_dir, CONVERSATIONS)  # base_score: the classifier's own head on h
    ids = render_ids(tokenizer_of(out), CONVERSATIONS)
    with torch.no_grad():
        got = torch.stack([model(torch.tensor([x])).base_score[0] for x in ids])
        scores = torch.stack([model(torch.tensor([x])).logits[0, 0] for x in ids])
    torch.testing.assert_close(got, expected["base_score"], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, expected["score"], atol=1e-5, rtol=0)
    assert got.abs().min() > 1e-3  # a visible head, not zeros


@pytest.mark.parametrize("gate, members, bias", [("softmax", 1, True), (None, 2, False)])
def test_other_gates_ensembles_and_biases_export(tmp_path, gate, members, bias):
    bb, heads_dir, out = export_tiny(tmp_path, gate=gate, members=members, bias=bias)
    expected = expected_from_heads(bb, heads_dir, CONVERSATIONS)
    config = json.loads((out / "config.json").read_text())
    assert config["urm"]["posterior"] is None
    del config["urm"]["posterior"]  # as an export made before the key was written
    (out / "config.json").write_text(json.dumps(config))
    model = load_export(out)
    ids = render_ids(tokenizer_of(out), CONVERSATIONS)
    with torch.no_grad():
        got = [model(torch.tensor([x])) for x in ids]
    torch.testing.assert_close(torch.stack([g.logits[0, 0] for g in got]), expected["score"], atol=1e-5, rtol=0)
    assert got[0].epistemic_std is None and got[0].attribute_epistemic_stds is None  # no posterior: not stated
    if gate is None:
        assert torch.allclose(got[0].gating_weights, torch.full((1, K), 1 / K))
    if members > 1:
        torch.testing.assert_close(torch.stack([g.ensemble_std[0] for g in got]), expected["ensemble_std"],
                                   atol=1e-5, rtol=1e-5)


def sharded_and_bare_copies(root: Path, bb: Path) -> dict[str, Path]:
    """The same tiny backbone saved three more ways: sharded with an index, and as a bare LlamaModel."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(bb)
    tok = tokenizer_of(bb)
    dirs = {"sharded": root / "sharded", "bare": root / "bare"}
    model.save_pretrained(dirs["sharded"], max_shard_size="20KB")
    model.model.save_pretrained(dirs["bare"])  # keys without the "model." prefix
    for d in dirs.values():
        tok.save_pretrained(d)
    return dirs


def test_sharded_and_bare_checkpoints_export_to_the_same_model(tmp_path):
    bb = build_tiny_llama(tmp_path / "backbone")
    reference = None
    for kind, directory in {"single": bb, **sharded_and_bare_copies(tmp_path, bb)}.items():
        heads = random_heads_dir(tmp_path / f"heads-{kind}", directory)
        out = tmp_path / f"model-{kind}"
        record = export_model(ExportConfig(backbone=str(directory), heads_dir=str(heads), out_dir=str(out)))
        if kind == "sharded":
            assert len(record["shards"]) > 2 and set(record["shards"].values()) == {"linked"}
            shard = sorted(record["shards"])[0]
            assert os.stat(out / shard).st_ino == os.stat(directory / shard).st_ino
        if kind == "bare":
            assert set(record["shards"].values()) == {"rewritten"}
        model = load_export(out)
        assert all(k.startswith(("model.", "score.", "weights.")) for k in model.state_dict())
        with torch.no_grad():
            scores = model(torch.tensor([[0, 5, 6, 7, 8, 1]])).logits
        reference = scores if reference is None else reference
        torch.testing.assert_close(scores, reference, atol=1e-6, rtol=0, msg=kind)


# ----------------------------------------------------------------------------------------------
# Refusals, atomicity, the command line


def test_heads_for_another_hidden_size_are_refused(tmp_path):
    bb = build_tiny_llama(tmp_path / "backbone")
    heads = random_heads_dir(tmp_path / "heads", bb, d=32, identity=cache_identity_of(bb, 32))
    with pytest.raises(ExportError, match="hidden size 32 but backbone .* has hidden_size 64"):
        export_model(ExportConfig(backbone=str(bb), heads_dir=str(heads), out_dir=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("field, value, message", [
    ("backbone_revision", "sha256-sampled:other", "at revision sha256-sampled:other"),
    ("chat_template_hash", "0123456789abcdef", "chat template hash 0123456789abcdef"),
])
def test_heads_from_another_backbone_are_refused(tmp_path, field, value, message):
    bb = build_tiny_llama(tmp_path / "backbone")
    heads = random_heads_dir(tmp_path / "heads", bb, identity=dataclasses.replace(cache_identity_of(bb, 64),
                                                                                  **{field: value}))
    with pytest.raises(ExportError, match=message):
        export_model(ExportConfig(backbone=str(bb), heads_dir=str(heads), out_dir=str(tmp_path / "m")))


def test_an_existing_out_dir_needs_overwrite(tmp_path):
    bb, heads, out = export_tiny(tmp_path)
    cfg = ExportConfig(backbone=str(bb), heads_dir=str(heads), out_dir=str(out))
    with pytest.raises(OutputRefused, match="already exists; pass --overwrite"):
        export_model(cfg)
    (out / "stale.txt").write_text("old export")
    export_model(ExportConfig(**{**cfg.__dict__, "overwrite": True}))
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert os.stat(out / "model-backbone.safetensors").st_ino == os.stat(bb / "model.safetensors").st_ino
    with pytest.raises(OutputRefused, match=f"--out-dir {heads}: it is --heads-dir {heads}, an input of this run"):
        export_model(ExportConfig(backbone=str(bb), heads_dir=str(heads), out_dir=str(heads), overwrite=True))


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import pipeline.recipes.export as E

    bb = build_tiny_llama(tmp_path / "backbone")
    heads = random_heads_dir(tmp_path / "heads", bb)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(E, "write_index", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(ExportConfig(backbone=str(bb), heads_dir=str(heads), out_dir=str(tmp_path / "m")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "heads"]


def test_the_backbone_is_opened_and_its_template_hashed_once_per_export(tmp_path, monkeypatch):
    import pipeline.features as F
    import pipeline.features.backbone as B

    bb = build_tiny_llama(tmp_path / "backbone")
    heads = random_heads_dir(tmp_path / "heads", bb)
    opened, hashed = [], []
    real_resolve, real_hash = B.resolve_backbone, F.chat_template_hash
    monkeypatch.setattr(B, "resolve_backbone", lambda *a: opened.append(a) or real_resolve(*a))
    monkeypatch.setattr(F, "chat_template_hash", lambda tok: hashed.append(tok) or real_hash(tok))
    export_model(ExportConfig(backbone=str(bb), heads_dir=str(heads), out_dir=str(tmp_path / "m")))
    assert len(opened) == 1
    assert len(hashed) == 2  # the backbone's tokenizer, and the exported one (checked to render the same)


def test_copy_instead_of_hardlink_and_backbone_from_heads_json(tmp_path):
    bb = build_tiny_llama(tmp_path / "backbone")
    heads = random_heads_dir(tmp_path / "heads", bb)
    out = tmp_path / "m"
    record = export_model(ExportConfig(backbone=None, heads_dir=str(heads), out_dir=str(out), link=False))
    assert record["backbone"]["spec"] == str(bb)  # value_head.cache.backbone
    assert record["shards"] == {"model-backbone.safetensors": "copied"}
    assert os.stat(out / "model-backbone.safetensors").st_ino != os.stat(bb / "model.safetensors").st_ino


def test_cli_export_end_to_end_and_its_errors_are_one_line(tmp_path):
    bb = build_tiny_llama(tmp_path / "backbone")
    heads = random_heads_dir(tmp_path / "heads", bb)
    runner = CliRunner()
    args = ["export", "--backbone", str(bb), "--heads-dir", str(heads), "--out-dir", str(tmp_path / "m")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "exported" in result.output and (tmp_path / "m" / "config.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already exists; pass --overwrite" in again.output
    assert "Traceback" not in again.output


@pytest.mark.integration
def test_the_text_classification_pipeline_returns_the_reward(tiny):
    """2K labels but one logit: without problem_type "regression" the pipeline's default softmax over that one
    logit would give 1.0 for every input; it gives the reward itself, as `logits[0][0]`."""
    from transformers import AutoTokenizer, pipeline

    _, _, out = tiny
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    model = load_export(out)
    texts = ["Hello there, how are you?", "The capital of France is Paris."]
    scored = pipeline("text-classification", model=model, tokenizer=tok)(texts)
    with torch.no_grad():
        want = [model(**tok(t, return_tensors="pt")).logits[0][0].item() for t in texts]
    assert [r["label"] for r in scored] == ["score", "score"]
    assert [r["score"] for r in scored] == pytest.approx(want, abs=1e-5)
    assert len({round(w, 4) for w in want}) == 2  # two different rewards, not a constant
