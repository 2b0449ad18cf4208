"""Advantage estimators: hand-computed cases for every estimator, norm and reward-to-go."""

import math

import numpy as np
import pytest

from finemem.advantages import compute_advantages, returns_to_go

# G = 2 rollouts, T = 3 steps.
R = [[1.0, 0.0, 2.0], [3.0, 0.0, 4.0]]


def approx(x):
    return pytest.approx(x, abs=1e-9)


def test_step_group_std_normalises_each_column():
    adv, stats = compute_advantages(R, "step_group", "std", epsilon=0.0)
    # column 0: values 1, 3 -> mean 2, pop std 1 -> -1, +1; column 1: all 0 -> zero variance;
    # column 2: 2, 4 -> -1, +1
    assert adv == [approx([-1.0, 0.0, -1.0]), approx([1.0, 0.0, 1.0])]
    assert stats["groups"] == 3
    assert stats["zero_variance_groups"] == pytest.approx(1 / 3)


def test_step_group_epsilon_and_mean_norm():
    adv, _ = compute_advantages(R, "step_group", "std", epsilon=1.0)
    assert adv[0] == approx([-0.5, 0.0, -0.5])
    adv, _ = compute_advantages(R, "step_group", "mean")
    assert adv == [approx([-1.0, 0.0, -1.0]), approx([1.0, 0.0, 1.0])]


def test_pooled_normalises_over_all_samples():
    adv, stats = compute_advantages(R, "pooled", "std", epsilon=0.0)
    values = np.array(R).ravel()
    mean, std = 10 / 6, values.std()
    assert adv[0] == approx([(1 - mean) / std, (0 - mean) / std, (2 - mean) / std])
    assert adv[1] == approx([(3 - mean) / std, (0 - mean) / std, (4 - mean) / std])
    assert stats["groups"] == 1 and stats["zero_variance_groups"] == 0
    adv, _ = compute_advantages(R, "pooled", "mean")
    assert adv[1][2] == approx(4 - mean)


def test_outcome_broadcasts_the_normalised_return():
    # returns 3 and 7 -> mean 5, std 2 -> -1, +1 on every step
    adv, stats = compute_advantages(R, "outcome", "std", epsilon=0.0)
    assert adv == [approx([-1.0] * 3), approx([1.0] * 3)]
    assert stats["groups"] == 1
    adv, _ = compute_advantages(R, "outcome", "mean")
    assert adv == [approx([-2.0] * 3), approx([2.0] * 3)]


def test_reward_to_go_step_group_and_pooled():
    assert returns_to_go(np.array(R)).tolist() == [[3.0, 2.0, 2.0], [7.0, 4.0, 4.0]]
    adv, stats = compute_advantages(R, "step_group", "mean", reward_to_go=True)
    # columns (3,7) (2,4) (2,4) -> -2/+2, -1/+1, -1/+1; no zero-variance column any more
    assert adv == [approx([-2.0, -1.0, -1.0]), approx([2.0, 1.0, 1.0])]
    assert stats["zero_variance_groups"] == 0
    adv, _ = compute_advantages(R, "pooled", "mean", reward_to_go=True)
    assert adv[0][0] == approx(3 - 22 / 6)


def test_reward_to_go_with_outcome_is_refused():
    with pytest.raises(ValueError, match="reward_to_go does not apply"):
        compute_advantages(R, "outcome", reward_to_go=True)


def test_zero_variance_group_gives_zero_not_nan():
    same = [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    for estimator in ("step_group", "pooled", "outcome"):
        adv, stats = compute_advantages(same, estimator, "std", epsilon=0.0)
        assert all(x == 0.0 and not math.isnan(x) for row in adv for x in row)
        assert stats["zero_variance_groups"] == 1.0
    # float noise (0.1 + 0.2 != 0.3) is still zero variance
    adv, stats = compute_advantages([[0.1 + 0.2], [0.3]], "step_group", epsilon=0.0)
    assert adv == [[0.0], [0.0]] and stats["zero_variance_groups"] == 1.0


def test_single_rollout_group_is_zero_variance():
    adv, stats = compute_advantages([[1.0, 2.0]], "step_group")
    assert adv == [[0.0, 0.0]] and stats["zero_variance_groups"] == 1.0


def test_std_normalised_step_columns_have_zero_mean_unit_std():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(8, 5)).tolist()
    adv = np.array(compute_advantages(rewards, "step_group", "std", epsilon=0.0)[0])
    assert np.allclose(adv.mean(axis=0), 0.0) and np.allclose(adv.std(axis=0), 1.0)


@pytest.mark.parametrize(
    "rewards, match",
    [
        ([[1.0, 2.0], [1.0]], "same number of steps"),
        ([], "no rollouts"),
        ([[], []], "no steps"),
        ([[1.0, float("nan")]], r"reward\[0\]\[1\]"),
    ],
)
def test_bad_matrices_raise_clear_errors(rewards, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages(rewards)


def test_unknown_options_raise():
    with pytest.raises(ValueError, match="unknown estimator"):
        compute_advantages(R, "grpo")
    with pytest.raises(ValueError, match="unknown norm"):
        compute_advantages(R, norm="max")
    with pytest.raises(ValueError, match="epsilon"):
        compute_advantages(R, epsilon=-1.0)
