"""`--gate auto` (docs/method.md 3): the gate chosen by cross-validation on pairs with a known answer, never one that
loses to a simpler gate; the constant gates stored in the URM gate's layout."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline import ATTRIBUTES
from pipeline.configs import GatingConfig, build
from pipeline.train import choose, fit_gate, global_weights, set_constant_gate, with_gate
from test_train import identity_value_head, prompt_dependent_pairs

K = len(ATTRIBUTES)


def global_truth_pairs(n=800, d=16, seed=0, weights=(1.0, 0.5, 0.0, 0.0, -0.5)):
    """Pairs whose preference is one fixed weight vector over mu_k = h[1 + k] for every prompt (plus noise): the
    global gate is the right model, and equal weights are not."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, n, d, generator=g)
    a[:, 0] = b[:, 0] = 1.0
    w = torch.tensor(weights)
    reward = lambda h: h[:, 1:1 + K] @ w  # noqa: E731
    a_wins = reward(a) + 0.3 * torch.randn(n, generator=g) > reward(b)
    return torch.where(a_wins[:, None], a, b).half(), torch.where(a_wins[:, None], b, a).half()


def auto(**options):
    return build(GatingConfig, dict(device="cpu", gate_hidden=16, gate_epochs=30, gate_batch_size=64, gate_lr=3e-3,
                                    gate_patience=5, **options))


def test_the_rule_falls_back_unless_the_gain_beats_the_noise():
    base = torch.tensor([0.60, 0.70, 0.50, 0.65] * 10)
    swing = torch.tensor([0.2, -0.2] * 20)
    # the MLP gains 0.005 on average over global, but pair by pair it swings by 0.2: noise, so global stays
    chosen, reasons = choose({"equal": base, "global": base - 0.05, "urm-warm": base - 0.055 + swing},
                             ["equal", "global", "urm-warm"])
    assert chosen == "global" and "keeps global" in reasons[-1]
    noisy = base + torch.tensor([0.02, -0.02] * 20)  # no better on average than equal weights
    chosen, reasons = choose({"equal": base, "global": noisy, "urm-warm": base - 0.2}, ["equal", "global", "urm-warm"])
    assert chosen == "urm-warm" and "chosen" in reasons[-1]
    assert choose({"equal": base, "global": base + 0.01}, ["equal", "global"])[0] == "equal"  # worse: kept simple


def test_the_choice_never_has_a_higher_loss_than_a_simpler_candidate():
    rng = random.Random(0)
    order = ["equal", "global", "urm-warm", "softmax"]
    for _ in range(200):
        n = rng.randint(5, 40)
        losses = {k: torch.tensor([rng.random() + rng.choice([0.0, 0.3]) * (i == 0) for _ in range(n)])
                  for i, k in enumerate(order)}
        chosen, _ = choose(losses, order)
        mine = float(losses[chosen].mean())
        assert all(mine <= float(losses[k].mean()) + 1e-12 for k in order[:order.index(chosen)])


def test_a_gate_that_should_fall_back_does():
    """Preference is one weight vector for every prompt: auto takes the global gate over equal weights, and the MLP
    gates, which can only fit noise beyond it, do not pay for themselves."""
    chosen, rejected = global_truth_pairs()
    fit = fit_gate(chosen, rejected, identity_value_head(), auto())
    sel = fit.selection
    assert sel["chosen"] == "global", sel["reasons"]
    assert sel["candidates"]["global"]["bt_loss_tempered"] < sel["candidates"]["equal"]["bt_loss_tempered"]
    assert fit.heads.gate == "urm" and fit.val["gate"] == "global"
    w = fit.heads.gate_weights(chosen[:50].float())
    assert torch.allclose(w, w[:1].expand_as(w))  # constant: the same weights for every row
    assert w[0, 0] > w[0, 1] > w[0, 2].abs() and w[0, 4] < 0  # the true weights' order and signs
    assert fit.val["accuracy"] > fit.val["equal_weights"]["accuracy"]


def test_a_gate_that_the_pairs_need_is_chosen():
    """Which attribute decides depends on the prompt (h[6]): no constant weight vector can rank these pairs, the
    MLP gates can, and auto chooses one of them."""
    chosen, rejected = prompt_dependent_pairs(n=1500)
    fit = fit_gate(chosen, rejected, identity_value_head(), auto(gate_candidates=["equal", "global", "urm-warm"]))
    sel = fit.selection
    assert sel["chosen"] == "urm-warm", sel["reasons"]
    assert sel["protocol"].startswith("5-fold cross-validation over all 1500 pairs")
    assert fit.val["accuracy"] > sel["candidates"]["global"]["accuracy"] + 0.1
    assert fit.calibration.validation_pairs == 1500  # temperatures from every pair's out-of-fold score


def test_the_validation_split_decides_with_one_fold_and_explicit_kinds_need_no_choice():
    chosen, rejected = global_truth_pairs(n=300)
    fit = fit_gate(chosen, rejected, identity_value_head(), auto(gate_folds=1, gate_candidates=["equal", "global"]))
    assert fit.selection["protocol"].startswith("the validation split (30 pairs") and fit.selection["chosen"] == "global"
    explicit = fit_gate(chosen, rejected, identity_value_head(), auto(gate="equal"))
    assert explicit.selection == {} and explicit.val["gate"] == "equal"
    w = explicit.heads.gate_weights(chosen[:3].float())
    assert torch.allclose(w, torch.full_like(w, 1 / K))


def test_global_weights_minimise_the_bt_loss_and_the_constant_gate_gives_them():
    chosen, rejected = global_truth_pairs(n=2000)
    mu = identity_value_head()
    mu_c, mu_r = (mu.score(x.float())[:, 0::2].detach() for x in (chosen, rejected))
    w = global_weights(mu_c, mu_r)
    loss = lambda v: -torch.nn.functional.logsigmoid((mu_c - mu_r) @ v).mean()  # noqa: E731
    for step in torch.eye(K) * 0.05:
        assert loss(w) <= loss(w + step) and loss(w) <= loss(w - step)
    heads = set_constant_gate(with_gate(mu, auto(gate="urm")), w)
    assert torch.allclose(heads.gate_weights(chosen[:4].float()), w.expand(4, K), atol=1e-6)


@pytest.mark.parametrize("bad, needle", [({"gate": "golbal"}, "did you mean 'global'?"),
                                         ({"gate_candidates": []}, "--gate-candidates is empty"),
                                         ({"gate_candidates": ["equal", "mlp"]}, "--gate-candidates must be one of"),
                                         ({"gate_folds": 0}, "--gate-folds")])
def test_bad_gate_options_are_clear(bad, needle):
    from pipeline.configs import ConfigError

    with pytest.raises(ConfigError, match=needle):
        build(GatingConfig, bad)


# ----------------------------------------------------------------------------------------------
# The same choice in less time (issue 26): the MLP gates only where the pairs can support them, fits in parallel


def test_mlp_gates_are_not_tried_on_fewer_pairs_than_the_features_can_be_interpolated_by(said):
    """120 pairs at d = 200: each fold's MLP would learn from 86 pairs, 172 feature vectors in 200 dimensions
    (linearly independent: it could give every pair any weights); the same pairs at d = 16 support them."""
    from pipeline.train.gate_selection import mlp_supported

    chosen, rejected = prompt_dependent_pairs(n=120, d=200)
    fit = fit_gate(chosen, rejected, identity_value_head(d=200), auto())
    sel = fit.selection
    assert set(sel["not_tried"]) == {"urm-warm", "softmax"} and set(sel["candidates"]) == {"equal", "global"}
    assert any("not tried" in line and "86 pairs" in line for line in said())
    assert not mlp_supported(86, 200) and mlp_supported(101, 200)
    small = fit_gate(chosen[:, :16].contiguous(), rejected[:, :16].contiguous(), identity_value_head(), auto())
    assert small.selection["not_tried"] == {} and "softmax" in small.selection["candidates"]
    only_mlp = fit_gate(chosen, rejected, identity_value_head(d=200), auto(gate_candidates=["urm-warm"]))
    assert only_mlp.selection["chosen"] == "urm-warm"  # asked for alone: tried whatever the rule says


def test_parallel_fits_give_the_sequential_choice_and_say_how_long_is_left(monkeypatch, said, caplog):
    import pipeline.train.gate_selection as S

    chosen, rejected = prompt_dependent_pairs(n=600)
    runs = {}
    for cores in (1, 2):
        monkeypatch.setattr(S, "available_cores", lambda: cores)
        caplog.clear()
        runs[cores] = fit_gate(chosen, rejected, identity_value_head(), auto()).selection, said()
    (one, _), (two, lines) = runs[1], runs[2]
    assert one["parallel_fits"] == 1 and two["parallel_fits"] == 2 and one["chosen"] == two["chosen"]
    for kind, row in one["candidates"].items():  # the same fits (their own thread counts aside: rounding only)
        assert two["candidates"][kind]["bt_loss"] == pytest.approx(row["bt_loss"], rel=1e-4)
        assert two["candidates"][kind].get("epochs") == row.get("epochs")
    progress = [line for line in lines if " fold " in line and "left)" in line]
    assert len(progress) == 10 and all(line.lstrip().startswith(("softmax", "urm-warm")) for line in progress)
    assert {line.split(" fold ")[1].split(":")[0] for line in progress} == {f"{i}/5" for i in range(1, 6)}
