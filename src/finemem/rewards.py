"""Reward maths of Fine-Mem (spec section 2) as pure functions: no I/O, no models, no randomness
beyond an explicit seed.

Steps are t = 1..T; every per-step list has length T with index 0 for t = 1.
The scorer (`reward/scorer.py`) gathers the raw inputs (question scores, evidence steps, op
validity, token counts); this module turns them into the per-step rewards and keeps every
component so it can be logged. Components are stored unweighted; the weights are applied only
in `compose`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from finemem.records import OpResult

PRESETS = ("finemem", "outcome_only", "csr_only", "eara_only", "memalpha")

# Which per-step components each preset adds up (spec section 2, ablations).
PRESET_COMPONENTS: dict[str, tuple[str, ...]] = {
    "finemem": ("eara", "format", "chunk", "compression"),
    "outcome_only": ("global", "format", "compression"),
    "csr_only": ("global", "format", "chunk", "compression"),
    "eara_only": ("eara", "format", "compression"),
    "memalpha": ("global", "format", "compression", "content"),
}


def preset_components(preset: str) -> tuple[str, ...]:
    """The component names a preset uses (raises for an unknown preset, naming the choices)."""
    if preset not in PRESET_COMPONENTS:
        raise ValueError(f"reward.preset={preset!r} is unknown (choose one of: {', '.join(PRESETS)})")
    return PRESET_COMPONENTS[preset]


# ----------------------------------------------------------------------------- chunk-level reward


def mean_score(scores: Sequence[float]) -> float:
    """Mean of question scores; 0.0 when there is no question (e.g. a chunk without chunk QA)."""
    return float(sum(scores) / len(scores)) if scores else 0.0


def chunk_reward(scores: Sequence[float]) -> float:
    """r_chunk(t): the fraction of chunk t's QA pairs answered correctly from M_t."""
    return mean_score(scores)


# ------------------------------------------------------------------------- global question sample


def derive_seed(run_seed: int, instance_id: str, step: int = 0) -> int:
    """A stable 63-bit seed from (run seed, instance id, training step); the same in every process
    (no `hash()`). Step 0 (outside training) keeps the seed of (run seed, instance id) alone, so
    evaluation asks what it always asked; each training step draws its own subset."""
    key = f"{run_seed}:{instance_id}" if step == 0 else f"{run_seed}:{instance_id}:step{step}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def num_global_questions(num_questions: int, fraction: float) -> int:
    """round(fraction * n) (halves up), at least 1 and at most n; 0 only when n == 0."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"reward.global_question_fraction must be in (0, 1], got {fraction}")
    if num_questions <= 0:
        return 0
    return max(1, min(num_questions, math.floor(fraction * num_questions + 0.5)))


def sample_global_questions(num_questions: int, fraction: float, seed: int) -> list[int]:
    """Indices (sorted) of the global questions asked for an instance.

    The seed comes from `derive_seed(run seed, instance id, training step)`, so every rollout of a
    GRPO group is asked the same questions and their rewards are comparable, and a later visit of
    the instance is asked a new subset.
    """
    m = num_global_questions(num_questions, fraction)
    return sorted(random.Random(seed).sample(range(num_questions), m))


# ------------------------------------------------------------------------------------------ EARA


@dataclass
class EaraResult:
    """r_eara(t) for t = 1..T, the evidence credit N_t, and how much credit found no owner."""

    rewards: list[float]
    credit: list[float]  # N_t
    r_global: float
    no_evidence_share: float  # fraction of questions whose evidence set was empty


def eara(
    question_scores: Sequence[float],
    evidence_steps: Sequence[Sequence[int]],
    num_steps: int,
    beta: float = 0.5,
) -> EaraResult:
    """Evidence-anchored reward attribution.

    `question_scores[j]` = s_j; `evidence_steps[j]` = the `step` stamp of each item in E_j (one
    entry per retrieved item). Then
    `N_t = (1/n) sum_j sum_{m in E_j, m.step == t} s_j / |E_j|` and
    `r_eara(t) = (1 - beta) * r_global / T + beta * N_t`.
    When every E_j is non-empty, sum_t r_eara(t) == r_global. A question with empty evidence gives
    its share to nobody (ours); `no_evidence_share` reports how often that happened.
    """
    n = len(question_scores)
    if len(evidence_steps) != n:
        raise ValueError(f"eara: {n} question scores but {len(evidence_steps)} evidence sets")
    if num_steps <= 0:
        raise ValueError(f"eara: num_steps must be positive, got {num_steps}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"reward.beta must be in [0, 1], got {beta}")
    credit = [0.0] * num_steps
    empty = 0
    for s, steps in zip(question_scores, evidence_steps):
        if not steps:
            empty += 1
            continue
        share = s / (n * len(steps))
        for t in steps:
            if not 1 <= t <= num_steps:
                raise ValueError(f"eara: evidence item written at step {t}, outside 1..{num_steps}")
            credit[t - 1] += share
    r_global = mean_score(question_scores)
    base = (1.0 - beta) * r_global / num_steps
    return EaraResult(
        rewards=[base + beta * c for c in credit],
        credit=credit,
        r_global=r_global,
        no_evidence_share=empty / n if n else 0.0,
    )


# ------------------------------------------------------------------------- format and compression


def is_skip_step(ops: Sequence[OpResult]) -> bool:
    """A step with no call: no ops at all, or only the environment's "skip" marker."""
    return all(op.op == "skip" for op in ops)


def format_reward(ops: Sequence[OpResult], skip_score: float = 1.0) -> float:
    """r_fmt(t): the fraction of the step's calls that were valid; a SKIP step scores `skip_score`."""
    calls = [op for op in ops if op.op != "skip"]
    if not calls:
        return float(skip_score)
    return sum(1 for op in calls if op.valid) / len(calls)


def compression_reward(memory_tokens: int, chunk_tokens: int) -> float:
    """r_comp = 1 - tokens(M_T) / sum_t tokens(c_t).

    Not clipped: a memory longer than its input gives a negative value. With no chunk tokens at
    all the ratio is undefined and the reward is 0.0.
    """
    if chunk_tokens <= 0:
        return 0.0
    return 1.0 - memory_tokens / chunk_tokens


def content_reward(judgements: Sequence[float], skip_score: float = 0.0) -> float:
    """Mem-alpha r_content(t): mean over the step's calls of the content judge (1 if the LLM judged an
    insert/update good, 0 otherwise; deletes and invalid calls are 0). A step with no call scores
    `skip_score`."""
    if not judgements:
        return float(skip_score)
    return float(sum(judgements) / len(judgements))


# ------------------------------------------------------------------------------------ composition


@dataclass
class RewardWeights:
    """The fixed coefficients of spec section 2 (config: reward.chunk_weight, ...)."""

    chunk: float = 0.5
    compression: float = 0.05
    content: float = 0.1


@dataclass
class RewardInputs:
    """Everything `compose` needs; per-step lists have length T. Unused components may be None."""

    format: list[float]
    r_global: float
    compression: float
    chunk: list[float] | None = None
    eara: list[float] | None = None
    content: list[float] | None = None


@dataclass
class RewardBreakdown:
    """The per-step total and its unweighted components (keys from `preset_components`)."""

    rewards: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)


def compose(preset: str, inputs: RewardInputs, weights: RewardWeights | None = None) -> RewardBreakdown:
    """Total per-step reward of a preset:

    - finemem:      r_eara(t) + r_fmt(t) + 0.5 r_chunk(t) + 0.05 r_comp
    - outcome_only: r_global + r_fmt(t) + 0.05 r_comp
    - csr_only:     r_global + r_fmt(t) + 0.5 r_chunk(t) + 0.05 r_comp
    - eara_only:    r_eara(t) + r_fmt(t) + 0.05 r_comp
    - memalpha:     r_global + r_fmt(t) + 0.05 r_comp + 0.1 r_content(t)
    """
    w = weights or RewardWeights()
    names = preset_components(preset)
    T = len(inputs.format)
    if T == 0:
        raise ValueError("compose: an episode needs at least one step")
    per_step: dict[str, list[float]] = {
        "global": [float(inputs.r_global)] * T,
        "format": [float(x) for x in inputs.format],
        "compression": [float(inputs.compression)] * T,
    }
    for name in ("chunk", "eara", "content"):
        values = getattr(inputs, name)
        if name in names:
            if values is None:
                raise ValueError(f"reward.preset={preset!r} needs the {name!r} component")
            if len(values) != T:
                raise ValueError(f"compose: {name!r} has {len(values)} steps, expected {T}")
            per_step[name] = [float(x) for x in values]
    scale = {
        "global": 1.0,
        "format": 1.0,
        "eara": 1.0,
        "chunk": w.chunk,
        "compression": w.compression,
        "content": w.content,
    }
    rewards = [sum(scale[n] * per_step[n][t] for n in names) for t in range(T)]
    return RewardBreakdown(rewards=rewards, components={n: per_step[n] for n in names})
