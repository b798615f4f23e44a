"""The over-optimisation benchmark's pure pieces (bench/overopt.py): KL_bon, the exact best-of-n expectation, the
gold construction, the gold-labelled pairs and their flips; and its wiring on a small pool of made-up features (the
real run, `python -m bench overopt --quick`, embeds ~80k tokens first: it is the benchmark's, not a test's)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench import overopt as O


def test_kl_bon_is_log_n_less_n_minus_one_over_n():
    kl = O.kl_bon([1, 2, 4, 256])
    assert kl[0] == 0.0
    assert kl[1] == pytest.approx(math.log(2) - 0.5)
    assert kl[3] == pytest.approx(math.log(256) - 255 / 256)
    assert np.all(np.diff(kl) > 0)


def test_best_of_n_is_the_exact_expectation_over_draws_without_replacement():
    rng = np.random.default_rng(0)
    reward, value = rng.normal(size=12), rng.normal(size=12)
    for n in (1, 3, 12):
        p = O.pick_probabilities(12, n)
        assert p.sum() == pytest.approx(1.0) and np.all(p >= 0)
    assert O.best_of_n(reward, value, 1) == pytest.approx(value.mean())  # n = 1: a random row
    assert O.best_of_n(reward, value, 12) == pytest.approx(value[reward.argmax()])  # n = N: the top-rewarded row
    # n = 4: against every one of the C(12, 4) = 495 draws, enumerated
    from itertools import combinations

    picks = [value[max(c, key=lambda i: reward[i])] for c in combinations(range(12), 4)]
    assert O.best_of_n(reward, value, 4) == pytest.approx(np.mean(picks))
    with pytest.raises(ValueError, match="1 <= n <= pool"):
        O.pick_probabilities(12, 13)


def test_best_of_n_gains_with_n_when_the_reward_is_the_value_and_loses_when_it_is_reversed():
    value = np.linspace(-1, 1, 50)
    gains = [O.best_of_n(value, value, n) for n in (1, 2, 8, 32)]
    assert np.all(np.diff(gains) > 0) and gains[-1] < 1.0
    assert O.best_of_n(-value, value, 32) < O.best_of_n(-value, value, 2) < 0


def test_kernel_ridge_loo_error_is_that_of_refitting_without_each_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(15, 3, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(15, generator=g, dtype=torch.float64)
    k = O.rbf(x, x, 1.0)
    alpha, coef, loo = O.kernel_ridge_loo(k, y, (0.3,))
    assert torch.allclose(k @ coef + y.mean(), (k @ torch.linalg.solve(k + 0.3 * torch.eye(15), y - y.mean()))
                          + y.mean())
    errors = []
    for i in range(15):
        keep = torch.arange(15) != i
        yc = y - y.mean()  # the same centring as the fit (the mean is not refitted)
        c = torch.linalg.solve(k[keep][:, keep] + 0.3 * torch.eye(14, dtype=torch.float64), yc[keep])
        errors.append((yc[i] - k[i, keep] @ c).item() ** 2)
    assert loo == pytest.approx(np.mean(errors), rel=1e-8)


def made_up_pool(n: int = 200, d: int = 6, seed: int = 0):
    """Features and a nonlinear target of them (what a gold fitted on real labels looks like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    target = torch.sin(2 * x[:, 0]) * torch.cos(x[:, 1]) + 0.5 * x[:, 2].square()
    return x, target


def test_the_gold_fits_a_nonlinear_target_a_linear_head_cannot_and_is_on_the_pool_scale():
    x, target = made_up_pool()
    y = torch.full((len(x), 5), float("nan"), dtype=torch.float64)
    labelled = torch.zeros(len(x), dtype=torch.bool)
    labelled[:150] = True
    y[:150, 0] = target[:150]
    y[:40, 1:] = x[:40, 3:4]  # the other attributes: few labels, a linear target
    gold, fit = O.fit_gold(x, labelled, y[labelled], [1.0, 0.0, 0.0, 0.0, 0.0])
    assert [a["labelled_rows"] for a in fit["attributes"]] == [150, 40, 40, 40, 40]
    g = gold.reward(x)
    assert g.mean().item() == pytest.approx(0.0, abs=1e-9) and g.std().item() == pytest.approx(1.0)
    # the gold follows the target off its labelled rows too
    assert torch.corrcoef(torch.stack([g[150:], target[150:]]))[0, 1] > 0.6
    assert fit["attributes"][0]["loo_r2"] > 0.4
    # a linear head reaches a fraction of it, but all of a linear target
    assert O.linear_share(x, g) < 0.7
    assert O.linear_share(x, x @ torch.arange(1.0, 7.0, dtype=torch.float64)) > 0.99


def test_bt_labels_follow_the_gold_by_bradley_terry():
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    a, b = torch.full((n,), math.log(3) * 0.25, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    first = O.bt_labels(a, b, 0.25, gen)  # sigmoid(log 3) = 0.75
    assert first.double().mean().item() == pytest.approx(0.75, abs=0.01)
    far = O.bt_labels(torch.tensor([5.0, -5.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 0.25, gen)
    assert far.tolist() == [True, False]


def test_flips_are_exactly_the_share_asked_and_swap_the_pair():
    gen = torch.Generator().manual_seed(1)
    flipped = O.flip_mask(10, 0.25, gen)
    assert int(flipped.sum()) == 2  # round(2.5) = 2, exactly
    assert int(O.flip_mask(8, 0.25, gen).sum()) == 2 and int(O.flip_mask(8, 0.0, gen).sum()) == 0
    pairs = torch.stack([torch.arange(10), torch.arange(10, 20)], 1)
    first = torch.arange(10) % 2 == 0
    out = O.oriented(pairs, first, flipped)
    for i in range(10):
        chosen_is_first = bool(first[i]) != bool(flipped[i])
        assert out[i].tolist() == (pairs[i].tolist() if chosen_is_first else pairs[i].flip(0).tolist())


def test_the_interval_is_the_t_interval_of_the_mean():
    s = O.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.131846786 * math.sqrt(2.5) / math.sqrt(5)  # t(0.95, 4)
    assert s["mean"] == 3.0 and s["ci90"] == pytest.approx([3.0 - half, 3.0 + half])


def test_method_steps_are_read_from_the_docstring():
    steps = O.method_steps(O.__doc__)
    assert list(steps) == ["pool", "gold", "training", "proxies", "best-of-n", "targets", "curation"]
    assert "kernel ridge" in steps["gold"] and "\n" not in steps["gold"]


@pytest.mark.integration
def test_a_seed_runs_end_to_end_on_a_small_pool(tmp_path, monkeypatch):
    """The wiring: a seed's split, proxies trained by this tool, rewards through the package's transforms, best-of-n
    curves, curation, the summary, the targets and the plot, on made-up features (train and shift sources)."""
    from bench import report as R

    x, _ = made_up_pool(n=700, d=12, seed=2)
    sources = np.array(["hh-rlhf"] * 300 + ["rmb"] * 340 + ["steerlm"] * 60)
    pairs = torch.stack([torch.arange(0, 640, 2), torch.arange(1, 640, 2)], 1)
    pair_source = sources[pairs[:, 0].numpy()]
    pool = O.Pool(x, sources, torch.full((700, 5), float("nan"), dtype=torch.float64), pairs, pair_source)
    monkeypatch.setattr(O, "SOURCES", {"hh-rlhf": ("", 150, "train"), "rmb": ("", 170, "shift")})
    g_attr = torch.stack([torch.sin(x[:, k]) + x[:, k + 5] for k in range(5)], 1)
    g_pool = (g_attr @ torch.tensor([1.0, 0.5, 0.25, 0.0, -0.1], dtype=torch.float64))
    g_pool = (g_pool - g_pool.mean()) / g_pool.std()
    runs = [O.run_seed(pool, g_pool, g_attr, seed, (1.0,), ("default",), True, ("keep_certain_0.5",))
            for seed in range(2)]
    r = runs[0]
    assert r["shift_candidates"] == 340 and r["candidates"] == 340 + 2 * 45 + 18
    p = r["proxies"]["default|1.0|0.25"]
    assert set(p["rewards"]) == {"mean", "lcb", "elcb", "min", "uwo"}
    assert p["pairs"] == 105 and p["label_agrees_with_gold"] < r["proxies"]["default|1.0|0.0"]["label_agrees_with_gold"]
    for v in p["rewards"].values():
        assert v["gold_gain"][1] == pytest.approx(0.0, abs=1e-9)  # n = 1 is a random pick
        assert v["proxy_gain"][256] >= v["proxy_gain"][4] > 0  # each reward's own gain rises with n
    assert all(r["oracle"][256] >= v["gold_gain"][256] for v in p["rewards"].values())
    c = r["curation"]
    assert set(c["training"]) == {"clean", "noisy", "keep_certain_0.5", "keep_certain_0.5_epistemic",
                                    "random_same_size"}
    assert {"epistemic_p", "epistemic_std", "bt_p", "random"} <= set(c["auroc_flipped"])
    assert c["training"]["clean"]["flipped_kept"] == 0 and c["training"]["noisy"]["flipped_kept"] == round(0.25 * 105)
    summary = O.summarise(runs, (1.0,), ("default",))
    assert summary["targets"]["best_conservative_under_noise"] in O.CONSERVATIVE
    mean = summary["proxies"]["default|1.0|0.25"]["rewards"]["mean"]
    assert mean["gain_256_over_mean"] == pytest.approx(1.0) and mean["gain_256_minus_mean"]["runs"] == [0.0, 0.0]
    assert mean["seeds_above_mean_256"] == 0
    out = O.plot(summary, (1.0,), ("default",), tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = {"method": O.method_steps(O.__doc__), "quick": True, "seeds": 2, "sizes": [1.0], "ns": list(O.NS),
              "kl_bon": O.kl_bon(O.NS).tolist(), "plot": "bench/results/x.png", "wall_seconds": 1.0,
              "extract_seconds": 0.0, "pool": {"rows": 700, "candidates_per_seed": r["candidates"],
                                               "shift_candidates_per_seed": r["shift_candidates"]},
              "gold": {"bandwidth": 1.0, "linear_share": 0.5, "weights": {"helpfulness": 1.0},
                       "attributes": [{"labelled_rows": 1, "alpha": 1.0, "loo_r2": 0.1}],
                       "by_source": {"hh-rlhf": {"rows": 200, "mean": 0.0, "std": 1.0}}, "real_pairs_agreeing": {}},
              **summary, "curation": O.summarise_curation([x["curation"] for x in runs])}
    tables = R.overopt(json.loads(json.dumps(result)))  # as stored: the n keys are strings
    assert any("gold gain" in caption for caption, _, _ in tables)
