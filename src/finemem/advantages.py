"""Advantage estimators over one instance's `[G, T]` reward matrix (spec section 3).

Row i is rollout i of the group, column t is step t+1. All G rollouts of an instance see the same
chunk stream, so every row has the same length T; a ragged matrix is a bug upstream and raises.

Estimators (each normalises a set of values, its *normalisation group*):

- `step_group` (default): each step column t is normalised across the G rollouts, so a step is
  compared only with the same step of the other rollouts. T groups per instance.
- `pooled` (Mem-alpha): all G*T values of the instance are normalised together. One group.
- `outcome`: the per-rollout return R_i = sum_t r[i][t] is normalised across the G rollouts and
  broadcast to every step of rollout i. One group.

Normalisation: `std` gives (x - mean) / (std + epsilon); `mean` gives x - mean. The std is the
population std (ddof=0) of the group (ours: it is defined for G=1 and matches the hand maths).
A group whose values are all equal (std below 1e-12, i.e. float noise) is a *zero-variance group*:
its advantages are exactly 0 (never NaN, even with epsilon=0). Its share is logged as
`zero_variance_groups`.

Reward-to-go (`reward_to_go=True`) first replaces r[i][t] by sum_{t' >= t} r[i][t']:
- `step_group`: column t then compares the returns-to-go of step t across rollouts;
- `pooled`: all G*T returns-to-go are normalised together;
- `outcome`: not applicable (the outcome already is the return from step 1), so it raises
  rather than silently ignoring the option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ESTIMATORS = ("step_group", "pooled", "outcome")
NORMS = ("std", "mean")
_ZERO_STD = 1e-12  # below this a group's values are equal up to float noise


def _as_matrix(rewards: Sequence[Sequence[float]]) -> np.ndarray:
    if len(rewards) == 0:
        raise ValueError("compute_advantages: the reward matrix has no rollouts (G = 0)")
    lengths = [len(row) for row in rewards]
    if len(set(lengths)) != 1:
        raise ValueError(
            f"compute_advantages: rollouts of one instance must have the same number of steps T, "
            f"got row lengths {lengths}"
        )
    if lengths[0] == 0:
        raise ValueError("compute_advantages: the reward matrix has no steps (T = 0)")
    matrix = np.asarray(rewards, dtype=np.float64)
    bad = np.argwhere(~np.isfinite(matrix))
    if len(bad):
        i, t = (int(x) for x in bad[0])
        raise ValueError(f"compute_advantages: reward[{i}][{t}] is {matrix[i, t]} (must be finite)")
    return matrix


def _normalise(values: np.ndarray, norm: str, epsilon: float) -> tuple[np.ndarray, bool]:
    """Normalise one group; returns (advantages, is_zero_variance)."""
    std = float(values.std())
    if std < _ZERO_STD:
        return np.zeros_like(values), True
    centred = values - values.mean()
    if norm == "mean":
        return centred, False
    return centred / (std + epsilon), False


def returns_to_go(matrix: np.ndarray) -> np.ndarray:
    """r[i][t] -> sum_{t' >= t} r[i][t'] (reverse cumulative sum along the steps)."""
    return np.flip(np.cumsum(np.flip(matrix, axis=1), axis=1), axis=1)


def compute_advantages(
    rewards: Sequence[Sequence[float]],
    estimator: str = "step_group",
    norm: str = "std",
    epsilon: float = 1e-6,
    reward_to_go: bool = False,
) -> tuple[list[list[float]], dict[str, float]]:
    """Advantages `[G][T]` for one instance, and stats for logging.

    stats: `groups` (number of normalisation groups), `zero_variance_groups` (their share with
    all-equal values), `reward_mean`, `reward_std`, `adv_mean`, `adv_abs_max`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"compute_advantages: unknown estimator {estimator!r} (choose one of {ESTIMATORS})")
    if norm not in NORMS:
        raise ValueError(f"compute_advantages: unknown norm {norm!r} (choose one of {NORMS})")
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"compute_advantages: epsilon must be a finite number >= 0, got {epsilon}")
    if reward_to_go and estimator == "outcome":
        raise ValueError(
            "compute_advantages: reward_to_go does not apply to the 'outcome' estimator "
            "(its return already sums every step); use step_group or pooled"
        )
    matrix = _as_matrix(rewards)
    t = matrix.shape[1]
    values = returns_to_go(matrix) if reward_to_go else matrix

    adv = np.zeros_like(matrix)
    zero_groups = 0
    if estimator == "step_group":
        for col in range(t):
            adv[:, col], zero = _normalise(values[:, col], norm, epsilon)
            zero_groups += zero
        n_groups = t
    elif estimator == "pooled":
        adv, zero = _normalise(values, norm, epsilon)
        zero_groups, n_groups = int(zero), 1
    else:  # outcome
        returns, zero = _normalise(values.sum(axis=1), norm, epsilon)
        adv = np.repeat(returns[:, None], t, axis=1)
        zero_groups, n_groups = int(zero), 1

    stats = {
        "groups": float(n_groups),
        "zero_variance_groups": zero_groups / n_groups,
        "reward_mean": float(matrix.mean()),
        "reward_std": float(matrix.std()),
        "adv_mean": float(adv.mean()),
        "adv_abs_max": float(np.abs(adv).max()),
    }
    return adv.tolist(), stats

