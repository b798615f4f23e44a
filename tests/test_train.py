"""The two training stages on synthetic caches with a known answer (docs/method.md 2-4)."""

from __future__ import annotations


import pytest
import torch

from pipeline import ATTRIBUTES
from pipeline.cache import CacheSpec, open_writer
from pipeline.configs import GatingConfig, ValueHeadConfig, build
from pipeline.data.testing import NOISE, linear_ratings
from pipeline.data.testing import LINEAR_RATINGS_TRAINING as STAGE1
from pipeline.errors import UserError
from pipeline.model import CacheIdentity, Heads, HeadsError, load_heads, save_heads
from pipeline.recipes.train import train_gating, train_value_head
from pipeline.train import fit_gate, fit_value_head
from tiny_models import heads_meta

K = len(ATTRIBUTES)


def prompt_dependent_pairs(n=4000, d=16, seed=0):
    """Pairs where WHICH attribute decides depends on the prompt: a shared prompt feature h[6] > 0
    means attribute 0 decides, else attribute 1. With the value head mu_k = h[1 + k] (see
    ``identity_value_head``), equal weights mix in 3 irrelevant attributes; a gate can learn it."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, n, d, generator=g)
    a[:, 0] = b[:, 0] = 1.0
    prompt = torch.randn(n, generator=g)
    a[:, 6] = b[:, 6] = prompt
    decides = 1 + (prompt <= 0).long()
    a_wins = (a.gather(1, decides[:, None]) > b.gather(1, decides[:, None]))
    return torch.where(a_wins, a, b).half(), torch.where(a_wins, b, a).half()


def identity_value_head(d=16) -> Heads:
    """mu_k = h[1 + k], sigma_k = 1."""
    heads = Heads(d, K)
    with torch.no_grad():
        heads.score.weight.zero_()
        for k in range(K):
            heads.score.weight[2 * k, 1 + k] = 1.0
    return heads


def write_cache(path, embedding, labels=None, *, backbone="tiny/backbone", template="tmpl-0"):
    """A one-part cache with the real writer: ratings if ``labels`` is given, else pairs
    (``embedding`` = (chosen, rejected))."""
    if labels is None:
        chosen, rejected = embedding
        n = len(chosen)
        embedding = torch.stack([chosen, rejected], 1).flatten(0, 1)  # c0, r0, c1, r1, ...
        pairs = dict(pair_id=[f"p{i // 2}" for i in range(2 * n)], role=["chosen", "rejected"] * n)
    else:
        pairs = {}
    kind = "ratings" if labels is not None else "preferences"
    spec = CacheSpec(backbone=backbone, backbone_revision="r0", hidden_size=embedding.shape[1],
                     storage_dtype="float16", max_length=64, chat_template_hash=template,
                     dataset=f"synthetic-{kind}", dataset_fingerprint="fp", kind=kind)
    writer = open_writer(path, spec)
    writer.write_part(0, dict(id=[str(i) for i in range(len(embedding))], source="synthetic",
                              n_tokens=torch.full((len(embedding),), 10, dtype=torch.int32).numpy(),
                              embedding=embedding, labels=labels, **pairs))
    writer.finish(1)
    return str(path)


STAGE2 = dict(gate_lr=1e-2, gate_batch_size=256, gate_epochs=15, gate_patience=5, device="cpu", gate_hidden=32)


# ----------------------------------------------------------------------------------------------
# Stage 1 on in-memory tensors


def small_fit(**overrides):
    h, y = linear_ratings(n=600, d=8)
    cfg = build(ValueHeadConfig, {**STAGE1, "loss": "reparam", "epochs": 4, "batch_size": 64, **overrides})
    return fit_value_head(h, y, cfg), h, y


def test_stage1_is_deterministic_on_cpu():
    a, _, _ = small_fit(loss="reparam", ensemble=2)
    b, _, _ = small_fit(loss="reparam", ensemble=2)
    for (name, x), (_, y) in zip(a.heads.state_dict().items(), b.heads.state_dict().items()):
        assert torch.equal(x, y), name
    assert a.history == [dict(e, seconds=f["seconds"], examples_per_s=f["examples_per_s"])
                         for e, f in zip(b.history, a.history)]


def test_ensemble_members_differ_and_their_scores_spread():
    fit, h, _ = small_fit(loss="nll", ensemble=3)
    ens = fit.heads.ensemble.weight
    assert ens.shape == (3, 2 * K, 8)
    assert all(not torch.equal(ens[i], ens[j]) for i in range(3) for j in range(i + 1, 3))
    # The saved score head's mean rows are the member average (so its mu is the members' mean mu);
    # its log-sigma rows are calibrated against those means, each member's against its own.
    assert torch.allclose(fit.heads.score.weight[0::2], ens[:, 0::2].mean(0))
    assert not torch.allclose(fit.heads.score.weight[1::2], ens[:, 1::2].mean(0))
    out = fit.heads(h[:100])
    assert out["ensemble_scores"].shape == (100, 3) and (out["ensemble_std"] > 0).all()
    assert torch.allclose(out["score"], out["ensemble_scores"].mean(-1), atol=1e-5)


def test_early_stopping_restores_the_best_epoch():
    fit, _, _ = small_fit(loss="nll", epochs=30, lr=0.3, patience=3, calibrate=False)  # lr too high
    best = fit.best_epoch[0]
    assert len(fit.history) == best + 3
    assert fit.val["nll"] == pytest.approx(fit.history[best - 1]["nll"], rel=1e-5)


def test_standardized_labels_are_folded_back_to_the_label_scale():
    fit, h, y = small_fit(loss="nll", epochs=40, standardize_labels=True)
    assert fit.heads.score.bias is not None  # mu = std * (W h + b) + mean needs a bias
    assert fit.label_scaling.mean[0] == pytest.approx(y[:, 0].mean().item(), abs=0.2)
    # The saved weights predict on the label scale: val MSE = the label noise variance.
    assert fit.val["mse"] == pytest.approx(NOISE.square().mean().item(), rel=0.15)
    assert fit.heads(h)["attribute_means"].mean().item() == pytest.approx(y.mean().item(), abs=0.1)


# ----------------------------------------------------------------------------------------------
# Stage 2 on in-memory tensors


@pytest.mark.parametrize("gate", ["urm", "softmax"])
def test_gate_weights_follow_the_prompt_and_beat_equal_weights(gate):
    chosen, rejected = prompt_dependent_pairs()
    fit = fit_gate(chosen, rejected, identity_value_head(), build(GatingConfig, dict(gate=gate, **STAGE2)))
    val, equal = fit.val, fit.val["equal_weights"]
    assert equal["accuracy"] < 0.7 and val["accuracy"] > 0.94  # gating wins by a wide margin
    w_std, w_mean = val["weights_std"], val["weights_mean"]
    for name in ATTRIBUTES[:2]:  # the two deciding attributes swap roles across prompts
        assert w_std[name] > 0.5 * abs(w_mean[name])
    for name in ATTRIBUTES[2:]:  # the irrelevant ones are pushed towards 0
        assert abs(w_mean[name]) < 0.2 * w_mean[ATTRIBUTES[0]]


def test_pair_temperatures_are_fitted_on_the_validation_pairs():
    """Under-confident softmax-gate scores (T < 1) and an identity value head whose sigma = 1 overstates
    the Gaussian's spread: the fitted temperatures cut the ECE of both probabilities."""
    chosen, rejected = prompt_dependent_pairs()
    fit = fit_gate(chosen, rejected, identity_value_head(), build(GatingConfig, dict(gate="softmax", **STAGE2)))
    pairs = fit.calibration
    assert pairs.validation_pairs == 400 and pairs.temperature_bt < 1 and pairs.temperature_gaussian < 1
    assert pairs.after["ece"] < 0.5 * pairs.before["ece"] and pairs.after["ece_gaussian"] < 0.5 * pairs.before["ece_gaussian"]
    assert pairs.before["ece"] == pytest.approx(fit.val["ece"])  # T = 1 is the plain report
    off = fit_gate(chosen, rejected, identity_value_head(),
                   build(GatingConfig, dict(gate="softmax", pair_temperature=False, **STAGE2))).calibration
    assert (off.temperature_bt, off.temperature_gaussian) == (1.0, 1.0) and off.after == off.before


def test_stage2_is_deterministic_and_leaves_the_value_head_alone():
    chosen, rejected = prompt_dependent_pairs(n=500)
    value = identity_value_head()
    before = {k: v.clone() for k, v in value.state_dict().items()}
    cfg = build(GatingConfig, {"gate": "urm", **STAGE2, "gate_epochs": 3})
    a, b = fit_gate(chosen, rejected, value, cfg), fit_gate(chosen, rejected, value, cfg)
    for (name, x), (_, y) in zip(a.heads.state_dict().items(), b.heads.state_dict().items()):
        assert torch.equal(x, y), name
    assert not a.heads.score.weight.requires_grad
    assert torch.equal(a.heads.score.weight, before["score.weight"])
    assert all(torch.equal(v, before[k]) for k, v in value.state_dict().items())


def test_margin_aware_gate_widens_the_gap_the_margin_asks_for():
    """-log sigmoid(s_c - s_r - margin): margin 0 trains exactly as plain BT; a margin of 3 asks each
    chosen score to clear the rejected one by 3, and the gate learns wider gaps (docs/method.md 3)."""
    chosen, rejected = prompt_dependent_pairs(n=1000)
    value, n = identity_value_head(), len(chosen)
    cfg = {"gate": "urm", **STAGE2, "gate_epochs": 5}
    plain = fit_gate(chosen, rejected, value, build(GatingConfig, cfg))
    with_margin = build(GatingConfig, {**cfg, "use_margin": True})
    zero = fit_gate(chosen, rejected, value, with_margin, margin=torch.zeros(n))
    wide = fit_gate(chosen, rejected, value, with_margin, margin=torch.full((n,), 3.0))
    assert all(torch.equal(a, b) for a, b in zip(plain.heads.state_dict().values(), zero.heads.state_dict().values()))

    def mean_gap(fit):
        with torch.no_grad():
            return (fit.heads(chosen.float())["score"] - fit.heads(rejected.float())["score"]).mean().item()

    assert mean_gap(wide) > 1.5 * mean_gap(plain) > 0
    assert "bt_margin_loss" in wide.val and "bt_margin_loss" not in plain.val
    assert wide.val["bt_margin_loss"] > wide.val["bt_loss"]
    with pytest.raises(UserError, match="--use-margin needs each pair's margin"):
        fit_gate(chosen, rejected, value, with_margin)


# ----------------------------------------------------------------------------------------------
# The public entry points on real caches


@pytest.mark.integration
def test_nll_recovers_the_noise_std_reparam_shrinks_it_and_calibration_gives_it_back(tmp_path):
    h, y = linear_ratings()
    cache = write_cache(tmp_path / "ratings", h, y.numpy())
    sigma, coverage = {}, {}
    for name, loss, calibrate in (("nll", "nll", False), ("reparam", "reparam", False),
                                  ("reparam+calibration", "reparam", True)):
        cfg = build(ValueHeadConfig, dict(ratings_cache=cache, heads_dir=str(tmp_path / name), loss=loss,
                                          calibrate=calibrate, **STAGE1))
        per = train_value_head(cfg)["val"]["per_attribute"]
        sigma[name] = torch.tensor([per[a]["mean_sigma"] for a in ATTRIBUTES])
        coverage[name] = torch.tensor([per[a]["coverage90"] for a in ATTRIBUTES])
    # nll: calibrated, every attribute's sigma within 10% of the true noise std (docs/method.md 2).
    assert torch.allclose(sigma["nll"], NOISE, rtol=0.10), sigma["nll"]
    # reparam: E[loss] = (mu - y)^2 + sigma^2 drives sigma towards 0, whatever the true noise.
    assert (sigma["reparam"] < 0.5 * sigma["nll"]).all(), sigma["reparam"]
    assert sigma["reparam"].mean() < 0.2 * NOISE.mean(), sigma["reparam"]
    assert (coverage["reparam"] < 0.6).all(), coverage["reparam"]
    # reparam's means with sigma refit on the held-out calibration split (the default): the noise std
    # again within 15%, and the central 90% interval covers 85-95% of validation labels.
    assert torch.allclose(sigma["reparam+calibration"], NOISE, rtol=0.15), sigma["reparam+calibration"]
    assert ((coverage["reparam+calibration"] > 0.85) & (coverage["reparam+calibration"] < 0.95)).all()
    _, calibrated = load_heads(tmp_path / "reparam+calibration")
    assert calibrated.sigma_calibration.method == "calibrated" and calibrated.sigma_calibration.calibration_rows == 400
    assert calibrated.sigma_calibration.before["coverage90"] < 0.6 < calibrated.sigma_calibration.after["coverage90"]
    _, meta = load_heads(tmp_path / "nll")
    assert meta.sigma_calibration.method == "as trained"
    assert meta.value_head.cache.fingerprint and meta.value_head.cache.backbone == "tiny/backbone"
    assert meta.value_head.config["loss"] == "nll" and meta.attributes == list(ATTRIBUTES)
    assert len(meta.value_head.history) == meta.value_head.epochs_run


def value_head_folder(tmp_path, ratings_cache) -> str:
    """A heads folder holding ``identity_value_head`` as if trained on ``ratings_cache``."""
    from pipeline.cache import read_manifest

    folder = str(tmp_path / "heads")
    heads = identity_value_head()
    save_heads(folder, heads, heads_meta(heads, CacheIdentity.of(ratings_cache, read_manifest(ratings_cache))))
    return folder


@pytest.mark.integration
def test_train_gating_adds_the_gate_and_keeps_the_value_head(tmp_path):
    chosen, rejected = prompt_dependent_pairs()
    ratings = write_cache(tmp_path / "ratings", chosen[:100], torch.zeros(100, K).numpy())
    prefs = write_cache(tmp_path / "prefs", (chosen, rejected))
    heads_dir = value_head_folder(tmp_path, ratings)
    before = load_heads(heads_dir)[0].score.weight.clone()
    summary = train_gating(build(GatingConfig, dict(preferences_cache=prefs, heads_dir=heads_dir, gate="urm", **STAGE2)))
    assert summary["val"]["accuracy"] > 0.94 and summary["val"]["equal_weights"]["accuracy"] < 0.7
    heads, meta = load_heads(heads_dir)
    assert torch.equal(heads.score.weight, before)  # bit-identical after stage 2
    assert heads.weights is not None and meta.gating.config["gate"] == "urm"
    assert meta.gating.cache.path == prefs
    out = heads(chosen[:4].float())
    assert set(out) == {"score", "score_std", "attribute_means", "attribute_stds", "gating_weights"}


@pytest.mark.parametrize("field, value", [("backbone", "other/backbone"), ("chat_template_hash", "tmpl-1")])
def test_train_gating_refuses_a_cache_from_another_backbone(tmp_path, field, value):
    chosen, rejected = prompt_dependent_pairs(n=50)
    ratings = write_cache(tmp_path / "ratings", chosen, torch.zeros(50, K).numpy())
    kwargs = {"backbone": value} if field == "backbone" else {"template": value}
    prefs = write_cache(tmp_path / "prefs", (chosen, rejected), **kwargs)
    heads_dir = value_head_folder(tmp_path, ratings)
    with pytest.raises(HeadsError, match=rf"{field} is '{value}' there") as err:
        train_gating(build(GatingConfig, dict(preferences_cache=prefs, heads_dir=heads_dir, **STAGE2)))
    assert prefs in str(err.value) and ratings in str(err.value)  # names both caches


def test_train_gating_with_margins_needs_every_pairs_margin(tmp_path):
    chosen, rejected = prompt_dependent_pairs(n=50)
    ratings = write_cache(tmp_path / "ratings", chosen, torch.zeros(50, K).numpy())
    prefs = write_cache(tmp_path / "prefs", (chosen, rejected))  # a dataset without margins
    heads_dir = value_head_folder(tmp_path, ratings)
    with pytest.raises(UserError, match=r"prefs: 50 of 50 pairs have no margin, which --use-margin needs"):
        train_gating(build(GatingConfig, dict(preferences_cache=prefs, heads_dir=heads_dir, use_margin=True, **STAGE2)))


def test_train_gating_refuses_another_hidden_size(tmp_path):
    chosen, rejected = prompt_dependent_pairs(n=50)
    ratings = write_cache(tmp_path / "ratings", chosen, torch.zeros(50, K).numpy())
    prefs = write_cache(tmp_path / "prefs", (chosen[:, :8], rejected[:, :8]))
    heads_dir = value_head_folder(tmp_path, ratings)
    with pytest.raises(HeadsError, match="hidden_size is 8 there but 16"):
        train_gating(build(GatingConfig, dict(preferences_cache=prefs, heads_dir=heads_dir, **STAGE2)))


def test_pairs_without_preference_train_no_gate(tmp_path, said):
    """Identical features on both sides of every pair: every gate ties on every pair, so none is fitted or saved;
    some such pairs are a warning with their count."""
    from pipeline.train import NoPreference

    chosen, rejected = prompt_dependent_pairs(n=300)
    cfg = build(GatingConfig, dict(gate="global", **STAGE2))
    with pytest.raises(NoPreference, match="all 300 pairs have identical chosen and rejected features"):
        fit_gate(chosen, chosen.clone(), identity_value_head(), cfg)
    some = rejected.clone()
    some[:30] = chosen[:30]
    fit_gate(chosen, some, identity_value_head(), cfg)
    assert any(line.startswith("warning: 30 of 300 pairs have identical chosen and rejected") for line in said())
    ratings = write_cache(tmp_path / "ratings", chosen[:100], torch.zeros(100, K).numpy())
    prefs = write_cache(tmp_path / "prefs", (chosen, chosen))
    heads_dir = value_head_folder(tmp_path, ratings)
    before = (tmp_path / "heads" / "heads.json").read_bytes()
    with pytest.raises(NoPreference, match=f"{prefs}: all 300 pairs"):  # names the cache
        train_gating(build(GatingConfig, dict(preferences_cache=prefs, heads_dir=heads_dir, **STAGE2)))
    assert (tmp_path / "heads" / "heads.json").read_bytes() == before and load_heads(heads_dir)[1].gating is None


def test_a_gate_not_better_than_chance_is_flagged_and_one_that_ties_everywhere_refused(tmp_path, said, caplog):
    """The sign test of the held-out pairs: preferences that do not depend on the features leave the gate at
    chance (a warning, and heads.json says so); real ones give a tiny p; no pair told apart is refused."""
    from pipeline.metrics import sign_test_p
    from pipeline.train import NoPreference
    from pipeline.train.trainers import against_chance

    chosen, rejected = prompt_dependent_pairs(n=2000)
    cfg = build(GatingConfig, dict(gate="global", **STAGE2))
    real = fit_gate(chosen, rejected, identity_value_head(), cfg).val["chance"]
    assert real["better_than_chance"] and real["p_value"] < 1e-6
    assert real["p_value"] == sign_test_p(real["wins"], real["untied"]) and real["where"] == "validation"
    coin = torch.rand(len(chosen), generator=torch.Generator().manual_seed(3)) < 0.5  # who "won": a coin
    noise_c, noise_r = torch.where(coin[:, None], chosen, rejected), torch.where(coin[:, None], rejected, chosen)
    caplog.clear()
    fit = fit_gate(noise_c, noise_r, identity_value_head(), cfg)
    chance = fit.val["chance"]
    assert not chance["better_than_chance"] and chance["p_value"] >= 0.05 and chance["untied"] == 200
    assert any(line.startswith("warning: the gate is not shown better than chance") for line in said())
    with pytest.raises(NoPreference, match="every one of the 4 validation pairs ties"):
        against_chance(torch.zeros(4), "validation")
    ratings = write_cache(tmp_path / "ratings", chosen[:100], torch.zeros(100, K).numpy())
    heads_dir = value_head_folder(tmp_path, ratings)
    prefs = write_cache(tmp_path / "prefs", (noise_c, noise_r))
    summary = train_gating(build(GatingConfig, dict(preferences_cache=prefs, heads_dir=heads_dir, gate="global",
                                                    **STAGE2)))
    recorded = load_heads(heads_dir)[1].gating.val["chance"]  # saved, but not as if it were a trained gate
    assert recorded["better_than_chance"] is False and recorded == summary["val"]["chance"]


def test_gate_on_an_ensemble_keeps_every_member_frozen():
    chosen, rejected = prompt_dependent_pairs(n=300)
    value = Heads(16, K, members=3)
    before = {k: v.clone() for k, v in value.state_dict().items()}
    fit = fit_gate(chosen, rejected, value, build(GatingConfig, {"gate": "softmax", **STAGE2, "gate_epochs": 2}))
    after = fit.heads.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not fit.heads.ensemble.weight.requires_grad
    out = fit.heads(chosen[:5].float())
    assert out["ensemble_scores"].shape == (5, 3)
    assert torch.allclose(out["gating_weights"].sum(-1), fit.heads.softmax_gate.scale)


def test_one_step_epochs_are_pointed_out(said, caplog):
    h, y = linear_ratings(n=300, d=8)
    fit_value_head(h, y, build(ValueHeadConfig, {**STAGE1, "loss": "reparam", "epochs": 1, "batch_size": 1024}))
    assert any("1 optimiser step(s) per epoch" in line and "--batch-size 16" in line for line in said())
    caplog.clear()
    fit_value_head(h, y, build(ValueHeadConfig, {**STAGE1, "loss": "reparam", "epochs": 1, "batch_size": 32}))
    assert not any(line.startswith("note:") for line in said())


def test_denormals_read_as_zero_inside_flush_denormals_blocks_and_again_after():
    from pipeline.train.optimization import flush_denormals

    tiny = torch.tensor([1e-39])  # below float32's smallest normal, 1.18e-38
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    with flush_denormals():
        with flush_denormals():  # nested: the inner block leaves the flags as the outer set them
            pass
        assert float(tiny * 1) == 0.0
    assert float(tiny * 1) == pytest.approx(1e-39, rel=1e-3)


@pytest.mark.integration
def test_training_stages_run_with_denormals_flushed(tmp_path, monkeypatch):
    """A stage's fit runs inside flush_denormals: a denormal computed there reads as zero (AdamW's decaying moments
    otherwise made an MLP gate's epochs 3x slower); after the stage it reads as itself again."""
    import pipeline.train as train_pkg

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    seen = []

    def spy(*args, **kwargs):
        seen.append(float(torch.tensor([1e-39]) * 1))
        return fit_gate(*args, **kwargs)

    monkeypatch.setattr(train_pkg, "fit_gate", spy)
    chosen, rejected = prompt_dependent_pairs(n=400)
    ratings = write_cache(tmp_path / "ratings", chosen[:100], torch.zeros(100, K).numpy())
    prefs = write_cache(tmp_path / "prefs", (chosen, rejected))
    heads_dir = value_head_folder(tmp_path, ratings)
    train_gating(build(GatingConfig, dict(preferences_cache=prefs, heads_dir=heads_dir, gate="global", **STAGE2)))
    assert seen == [0.0]
    assert float(torch.tensor([1e-39]) * 1) == pytest.approx(1e-39, rel=1e-3)
