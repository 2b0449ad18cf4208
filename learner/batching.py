"""From scored groups to training samples, loss weights and token-budgeted micro-batches.

One `TrainSample` per (rollout, step): the step's exact prompt and response token ids and the
engine's sampling logprobs (never re-tokenised), with the step's advantage.

Empty responses (ours): the engine returns at least EOS for a normal stop, so an empty
`response_ids` only comes from a zero token budget or an engine error. It has no token to train
on, so it is dropped and counted (`empty_responses`); its rollout is averaged over its remaining
samples, and a rollout with no sample left does not count in the number of rollouts.

Loss weights are computed over the whole step batch (see `learner.loss`), so the micro-batch
split and the data-parallel split never change the gradient.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from finemem.advantages import compute_advantages
from finemem.records import ScoredEpisode


@dataclass
class TrainSample:
    """One (rollout, step) training sample.

    `rollout_key` identifies the rollout (the episode id) for the per-rollout mean;
    `loss_weight` is the weight of each of its response tokens, set by `assign_loss_weights`.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float]
    advantage: float
    rollout_key: str
    policy_version: int
    step: int = 0
    loss_weight: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSample:
        return cls(**d)


def samples_from_groups(
    groups: Sequence[Sequence[ScoredEpisode]],
    estimator: str = "step_group",
    norm: str = "std",
    epsilon: float = 1e-6,
    reward_to_go: bool = False,
) -> tuple[list[TrainSample], dict[str, float]]:
    """Advantages per group (one group = the G scored episodes of one instance), then samples.

    Returns the samples of the whole step batch with their loss weights assigned, and stats:
    `groups`, `rollouts`, `samples`, `empty_responses`, `response_tokens`,
    `zero_variance_groups` (share over all normalisation groups), `reward_mean`, `adv_abs_max`.
    """
    samples: list[TrainSample] = []
    norm_groups = zero_groups = empty = 0
    reward_sum = reward_count = 0.0
    adv_abs_max = 0.0
    for group in groups:
        _check_group(group)
        advantages, stats = compute_advantages(
            [scored.rewards for scored in group], estimator, norm, epsilon, reward_to_go
        )
        norm_groups += int(stats["groups"])
        zero_groups += round(stats["zero_variance_groups"] * stats["groups"])
        adv_abs_max = max(adv_abs_max, stats["adv_abs_max"])
        for scored, adv_row in zip(group, advantages):
            episode = scored.episode
            reward_sum += sum(scored.rewards)
            reward_count += len(scored.rewards)
            for step, adv in zip(episode.steps, adv_row):
                if not step.response_ids:
                    empty += 1
                    continue
                samples.append(
                    TrainSample(
                        prompt_ids=list(step.prompt_ids),
                        response_ids=list(step.response_ids),
                        old_logprobs=[float(x) for x in step.logprobs],
                        advantage=float(adv),
                        rollout_key=episode.episode_id,
                        policy_version=step.policy_version,
                        step=step.step,
                    )
                )
    assign_loss_weights(samples)
    stats = {
        "groups": float(len(groups)),
        "rollouts": float(len({s.rollout_key for s in samples})),
        "samples": float(len(samples)),
        "empty_responses": float(empty),
        "response_tokens": float(sum(len(s.response_ids) for s in samples)),
        "zero_variance_groups": zero_groups / norm_groups if norm_groups else 0.0,
        "reward_mean": reward_sum / reward_count if reward_count else 0.0,
        "adv_abs_max": adv_abs_max,
    }
    return samples, stats


def _check_group(group: Sequence[ScoredEpisode]) -> None:
    """A group must be one instance's episodes, each with one reward and one sample per step."""
    if not group:
        raise ValueError("samples_from_groups: empty group")
    instance_ids = {scored.episode.instance.instance_id for scored in group}
    if len(instance_ids) != 1:
        raise ValueError(f"samples_from_groups: a group mixes instances {sorted(instance_ids)}")
    for scored in group:
        ep = scored.episode
        where = f"instance {ep.instance.instance_id!r}, episode {ep.episode_id!r}"
        if len(scored.rewards) != len(ep.steps):
            raise ValueError(f"{where}: {len(scored.rewards)} rewards for {len(ep.steps)} steps")
        for step in ep.steps:
            if len(step.logprobs) != len(step.response_ids):
                raise ValueError(
                    f"{where}, step {step.step}: {len(step.logprobs)} logprobs for "
                    f"{len(step.response_ids)} response tokens"
                )
            if not step.prompt_ids:
                raise ValueError(f"{where}, step {step.step}: empty prompt_ids")
    lengths = {len(scored.rewards) for scored in group}
    if len(lengths) != 1:
        raise ValueError(
            f"instance {group[0].episode.instance.instance_id!r}: episodes have different step counts "
            f"{sorted(lengths)} (every rollout of an instance must run all T steps)"
        )


def assign_loss_weights(samples: list[TrainSample]) -> None:
    """Set each sample's per-token weight 1 / (tokens * samples_in_its_rollout * rollouts), in place.

    Over the batch the weights of all response tokens sum to 1, so the loss is the token-mean per
    sample, averaged per rollout, averaged over rollouts.
    """
    if not samples:
        return
    per_rollout = Counter(s.rollout_key for s in samples)
    n_rollouts = len(per_rollout)
    for s in samples:
        if not s.response_ids:
            raise ValueError(f"assign_loss_weights: rollout {s.rollout_key!r} step {s.step} has no response tokens")
        s.loss_weight = 1.0 / (len(s.response_ids) * per_rollout[s.rollout_key] * n_rollouts)


def drop_stale_rollouts(
    samples: list[TrainSample], version: int, max_staleness: int
) -> tuple[list[TrainSample], dict[str, float]]:
    """Keep only the rollouts whose every step is at most `max_staleness` versions behind `version`.

    A rollout is dropped whole when its oldest step is too stale: its advantages were normalised
    together with its other steps (and its group), so keeping part of it would train on a
    truncated rollout whose remaining steps get a larger share of the rollout mean. The kept
    samples get their loss weights reassigned (`assign_loss_weights`, in place) so they again sum
    to 1 over the batch, each kept rollout weighing 1 / kept rollouts.

    Returns the kept samples (the same objects, in order) and `dropped_rollouts`, `dropped_samples`.
    """
    oldest: dict[str, int] = {}
    for s in samples:
        oldest[s.rollout_key] = min(oldest.get(s.rollout_key, s.policy_version), s.policy_version)
    stale = {key for key, v in oldest.items() if version - v > max_staleness}
    kept = [s for s in samples if s.rollout_key not in stale]
    if stale:
        assign_loss_weights(kept)
    return kept, {"dropped_rollouts": float(len(stale)), "dropped_samples": float(len(samples) - len(kept))}


def split_mini_batches(samples: Sequence[TrainSample], n: int) -> list[list[TrainSample]]:
    """Split a step batch into `n` mini-batches, one optimizer step each (PPO mini-batches).

    Whole rollouts are dealt round-robin in order of first appearance, so every mini-batch mixes
    instances and groups, and the split is deterministic (exact resume). Each mini-batch gets
    re-weighted copies (`assign_loss_weights`): its loss is the spec's mean over its own rollouts,
    the same scale as a whole-batch step. `n` larger than the number of rollouts gives one
    mini-batch per rollout; `n=1` returns the samples as they are.
    """
    if n < 1:
        raise ValueError(f"algo.mini_batches must be >= 1, got {n}")
    if n == 1:
        return [list(samples)]
    order = list(dict.fromkeys(s.rollout_key for s in samples))
    slot = {key: i % n for i, key in enumerate(order)}
    minis: list[list[TrainSample]] = [[] for _ in range(min(n, len(order)))]
    for s in samples:
        minis[slot[s.rollout_key]].append(replace(s))
    for mini in minis:
        assign_loss_weights(mini)
    return minis


def make_micro_batches(samples: Sequence[TrainSample], micro_batch_tokens: int) -> list[list[int]]:
    """Pack sample indices into micro-batches whose padded size fits `micro_batch_tokens`.

    The padded size of a micro-batch is `len(batch) * longest(prompt + response)`, which is what
    the forward pass really holds (and is >= the sum of its tokens). Samples are taken longest
    first (ties by index), so each batch's first sample sets its padded length and padding is
    small; a sample longer than the budget gets a micro-batch of its own. Deterministic.
    """
    if micro_batch_tokens <= 0:
        raise ValueError(f"make_micro_batches: micro_batch_tokens must be > 0, got {micro_batch_tokens}")
    order = sorted(range(len(samples)), key=lambda i: (-samples[i].num_tokens, i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = samples[i].num_tokens
        if current and (len(current) + 1) * max(longest, size) > micro_batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


def split_for_ranks(micro_batches: list[list[int]], world_size: int) -> list[list[list[int]]]:
    """Deal micro-batches round-robin to the data-parallel ranks, padded to equal counts.

    Every rank must run the same number of backward passes (ZeRO reduces gradients during each
    backward), so a rank short of work gets empty micro-batches `[]`, which the learner runs as a
    zero-weight dummy pass.
    """
    if world_size < 1:
        raise ValueError(f"split_for_ranks: world_size must be >= 1, got {world_size}")
    per_rank = max(1, math.ceil(len(micro_batches) / world_size))
    shares = [micro_batches[rank::world_size] for rank in range(world_size)]
    return [share + [[] for _ in range(per_rank - len(share))] for share in shares]


def collate(samples: Sequence[TrainSample], pad_id: int = 0, device: str = "cpu") -> dict:
    """Right-padded tensors for one micro-batch (`learner.loss` layout).

    Returns `input_ids`, `attention_mask`, `response_mask` (`[B, L]`), `old_logprobs` (`[B, L]`,
    at the response positions), `advantages` and `token_weights` (`[B]`). An empty list gives a
    one-token dummy with zero weight.
    """
    import torch

    if not samples:
        dummy = TrainSample([pad_id], [pad_id], [0.0], 0.0, "", 0, loss_weight=0.0)
        return collate([dummy], pad_id, device)
    length = max(s.num_tokens for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, length), dtype=torch.bool)
    old_logprobs = torch.zeros((batch, length), dtype=torch.float32)
    for row, s in enumerate(samples):
        if len(s.old_logprobs) != len(s.response_ids):
            raise ValueError(
                f"collate: rollout {s.rollout_key!r} step {s.step}: {len(s.old_logprobs)} old logprobs "
                f"for {len(s.response_ids)} response tokens"
            )
        p, n = len(s.prompt_ids), s.num_tokens
        input_ids[row, :n] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        response_mask[row, p:n] = True
        old_logprobs[row, p:n] = torch.tensor(s.old_logprobs, dtype=torch.float32)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "response_mask": response_mask.to(device),
        "old_logprobs": old_logprobs.to(device),
        "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
        "token_weights": torch.tensor([s.loss_weight for s in samples], dtype=torch.float32, device=device),
    }
