"""Reward transforms (pipeline.model.rewards) against values worked out by hand, and their refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model import SUBTRACTS, TRANSFORMS, lower_bound, reward, rewards_of, risk_ok, uncertainty_weighted, worst_member

# Two rows, three members. Row 0: members 1, 2, 3 -> mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1, min 1.
# Row 1: members -1, 1, 3 -> mean 1, variance (4 + 0 + 4) / 2 = 4, min -1.
SCORE = np.array([2.0, 1.0])
SCORE_STD = np.array([0.5, 0.25])
MEMBERS = np.array([[1.0, 2.0, 3.0], [-1.0, 1.0, 3.0]])
EPISTEMIC_STD = np.array([0.25, 2.0])  # row 1 far from the training rows: the epistemic lower bound drops it


@pytest.mark.parametrize("transform, risk, want", [
    ("mean", 7.0, [2.0, 1.0]),
    ("lcb", 1.0, [1.5, 0.75]),  # 2 - 0.5, 1 - 0.25
    ("lcb", 2.0, [1.0, 0.5]),
    ("lcb", 0.0, [2.0, 1.0]),
    ("elcb", 1.0, [1.75, -1.0]),  # 2 - 0.25, 1 - 2
    ("elcb", 0.5, [1.875, 0.0]),
    ("min", 3.0, [1.0, -1.0]),
    ("uwo", 1.0, [1.0, -3.0]),  # 2 - 1 * 1, 1 - 1 * 4
    ("uwo", 0.5, [1.5, -1.0]),  # 2 - 0.5 * 1, 1 - 0.5 * 4
])
def test_each_transform_gives_the_hand_computed_reward(transform, risk, want):
    got = reward(transform, risk, SCORE, SCORE_STD, MEMBERS, EPISTEMIC_STD)
    assert got.dtype == np.float64 and got.tolist() == want


def test_the_pieces_and_the_outputs_dict_agree():
    out = {"score": SCORE.astype(np.float32), "score_std": SCORE_STD.astype(np.float32),
           "ensemble_scores": MEMBERS.astype(np.float32), "ensemble_std": MEMBERS.std(-1, ddof=1),
           "epistemic_std": EPISTEMIC_STD.astype(np.float32)}
    assert rewards_of(out, "elcb", 1.0).tolist() == [1.75, -1.0]  # the epistemic std, not score_std
    assert rewards_of(out, "lcb", 1.0).tolist() == lower_bound(SCORE, SCORE_STD, 1.0).tolist() == [1.5, 0.75]
    assert rewards_of(out, "min", 1.0).tolist() == worst_member(MEMBERS).tolist()
    # uwo's variance is the square of the ensemble_std a row states: checkable from the row alone
    assert rewards_of(out, "uwo", 2.0) == pytest.approx(MEMBERS.mean(-1) - 2.0 * out["ensemble_std"] ** 2)
    assert uncertainty_weighted(torch.tensor(MEMBERS), 1.0).tolist() == [1.0, -3.0]  # CPU tensors go in too


def test_mean_is_the_score_itself_bit_for_bit():
    score = np.random.default_rng(0).normal(size=50).astype(np.float32)
    assert rewards_of({"score": score}, "mean", 1.0).tolist() == score.tolist()


@pytest.mark.parametrize("risk", [-0.1, float("nan"), float("inf"), 1e308, 1e6 + 1, True, "1"])
def test_a_bad_risk_is_refused(risk):
    assert not risk_ok(risk)
    with pytest.raises(ValueError, match="a number from 0 to 1e6"):
        reward("lcb", risk, SCORE, SCORE_STD)


def test_ensemble_transforms_need_members_and_unknown_ones_are_named():
    for transform in ("min", "uwo"):
        with pytest.raises(ValueError, match="needs ensemble_scores"):
            reward(transform, 1.0, SCORE, SCORE_STD)
        with pytest.raises(ValueError, match="2 or more members"):
            reward(transform, 1.0, SCORE, SCORE_STD, MEMBERS[:, :1])
    with pytest.raises(ValueError, match="elcb needs epistemic_std"):  # heads without a ridge posterior
        rewards_of({"score": SCORE, "score_std": SCORE_STD}, "elcb", 1.0)
    with pytest.raises(ValueError, match="unknown reward transform 'max'"):
        reward("max", 1.0, SCORE)
    assert TRANSFORMS == ("mean", "lcb", "elcb", "min", "uwo")
    assert set(SUBTRACTS) == set(TRANSFORMS) and "aleatoric" in SUBTRACTS["lcb"] and "epistemic" in SUBTRACTS["elcb"]
