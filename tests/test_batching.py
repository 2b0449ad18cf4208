"""Scored groups -> training samples, loss weights, micro-batches, rank split, collate."""

import pytest

from finemem.records import Episode, Instance, QAPair, ScoredEpisode, StepSample
from learner.batching import (
    TrainSample,
    assign_loss_weights,
    collate,
    make_micro_batches,
    samples_from_groups,
    split_for_ranks,
)


def _scored(instance, episode_id, rewards, responses):
    steps = [
        StepSample(
            step=t + 1,
            prompt_ids=[1, 2, 3][: t + 1],
            response_ids=list(resp),
            logprobs=[-0.5] * len(resp),
            response_text="",
            ops=[],
            memory=[],
            policy_version=7,
        )
        for t, resp in enumerate(responses)
    ]
    episode = Episode(episode_id=episode_id, instance=instance, group_index=0, steps=steps)
    return ScoredEpisode(episode=episode, rewards=list(rewards), components={}, evidence=[], global_score=0.0)


def _instance(name="inst", steps=2):
    return Instance(instance_id=name, chunks=["c"] * steps, questions=[QAPair("q", ["a"])])


def test_samples_carry_ids_logprobs_advantages_and_weights():
    inst = _instance()
    group = [
        _scored(inst, "e0", [1.0, 0.0], [[5, 6], [7]]),
        _scored(inst, "e1", [3.0, 0.0], [[8], [9, 10, 11]]),
    ]
    samples, stats = samples_from_groups([group], "step_group", "mean")
    assert [(s.rollout_key, s.step, s.advantage) for s in samples] == [
        ("e0", 1, -1.0), ("e0", 2, 0.0), ("e1", 1, 1.0), ("e1", 2, 0.0),
    ]
    first = samples[0]
    assert first.prompt_ids == [1] and first.response_ids == [5, 6] and first.old_logprobs == [-0.5, -0.5]
    assert first.policy_version == 7
    # weight = 1 / (tokens * samples_in_rollout * rollouts)
    assert [s.loss_weight for s in samples] == pytest.approx([1 / 8, 1 / 4, 1 / 4, 1 / 12])
    total = sum(s.loss_weight * len(s.response_ids) for s in samples)
    assert total == pytest.approx(1.0)
    assert stats["rollouts"] == 2 and stats["samples"] == 4 and stats["zero_variance_groups"] == 0.5
    assert stats["response_tokens"] == 7


def test_empty_response_is_dropped_and_counted():
    inst = _instance()
    group = [_scored(inst, "e0", [1.0, 0.0], [[5], []]), _scored(inst, "e1", [0.0, 1.0], [[], []])]
    samples, stats = samples_from_groups([group])
    assert [(s.rollout_key, s.step) for s in samples] == [("e0", 1)]
    assert stats["empty_responses"] == 3 and stats["rollouts"] == 1
    assert samples[0].loss_weight == 1.0


def test_weights_span_the_whole_batch_of_groups():
    a, b = _instance("a"), _instance("b")
    groups = [
        [_scored(a, "a0", [1.0, 0.0], [[1], [1]]), _scored(a, "a1", [0.0, 1.0], [[1], [1]])],
        [_scored(b, "b0", [1.0, 0.0], [[1], [1]]), _scored(b, "b1", [0.0, 1.0], [[1], [1]])],
    ]
    samples, _ = samples_from_groups(groups)
    assert all(s.loss_weight == pytest.approx(1 / (1 * 2 * 4)) for s in samples)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda i: [_scored(i, "e0", [1.0, 0.0], [[1], [1]]), _scored(i, "e1", [1.0], [[1]])], "different step counts"),
        (lambda i: [_scored(i, "e0", [1.0], [[1], [1]])], "1 rewards for 2 steps"),
        (lambda i: [_scored(_instance("x"), "e0", [1.0, 0.0], [[1], [1]]), _scored(i, "e1", [1.0, 0.0], [[1], [1]])],
         "mixes instances"),
    ],
)
def test_bad_groups_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        samples_from_groups([make(_instance())])


def test_logprob_count_mismatch_names_episode_and_step():
    inst = _instance()
    bad = _scored(inst, "e9", [1.0, 0.0], [[1], [1, 2]])
    bad.episode.steps[1].logprobs = [-1.0]
    with pytest.raises(ValueError, match="episode 'e9', step 2: 1 logprobs for 2 response tokens"):
        samples_from_groups([[bad]])


def _sample(prompt_len, response_len, key="r"):
    return TrainSample([1] * prompt_len, [2] * response_len, [0.0] * response_len, 0.0, key, 0)


def test_micro_batches_respect_the_padded_budget_and_are_deterministic():
    samples = [_sample(3, 2), _sample(10, 5), _sample(2, 2), _sample(4, 4), _sample(1, 1)]  # 5 15 4 8 2
    batches = make_micro_batches(samples, micro_batch_tokens=16)
    assert batches == [[1], [3, 0], [2, 4]]  # longest first; 2*8 <= 16, 3*8 > 16
    for batch in batches:
        longest = max(samples[i].num_tokens for i in batch)
        assert len(batch) * longest <= 16
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert make_micro_batches(samples, 16) == batches


def test_over_long_sample_gets_its_own_micro_batch():
    samples = [_sample(30, 10), _sample(1, 1), _sample(1, 1)]
    assert make_micro_batches(samples, micro_batch_tokens=8) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        make_micro_batches(samples, 0)


def test_split_for_ranks_pads_with_empty_micro_batches():
    assert split_for_ranks([[0], [1], [2]], 2) == [[[0], [2]], [[1], []]]
    assert split_for_ranks([[0], [1]], 1) == [[[0], [1]]]
    assert split_for_ranks([], 2) == [[[]], [[]]]


def test_assign_loss_weights_refuses_empty_response():
    with pytest.raises(ValueError, match="no response tokens"):
        assign_loss_weights([_sample(2, 0)])


def test_collate_layout():
    a = TrainSample([1, 2], [3, 4], [-0.1, -0.2], 0.5, "r0", 0, loss_weight=0.25)
    b = TrainSample([5], [6], [-0.3], -1.0, "r1", 0, loss_weight=0.5)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["response_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch["old_logprobs"].flatten().tolist() == pytest.approx([0, 0, -0.1, -0.2, 0, -0.3, 0, 0])
    assert batch["advantages"].tolist() == [0.5, -1.0]
    assert batch["token_weights"].tolist() == [0.25, 0.5]
    dummy = collate([])
    assert dummy["token_weights"].tolist() == [0.0] and dummy["response_mask"].tolist() == [[False, True]]


def test_train_sample_round_trips_through_a_dict():
    s = TrainSample([1], [2], [-0.5], 1.5, "r", 3, step=2, loss_weight=0.1)
    assert TrainSample.from_dict(s.to_dict()) == s


def test_split_mini_batches_keeps_rollouts_whole_and_reweights_each_part():
    from learner.batching import split_mini_batches

    samples = [
        TrainSample([1, 2], [3] * n, [0.0] * n, 1.0, f"r{r}", 0, step=t)
        for r in range(5) for t, n in enumerate((1, 2, 3))
    ]
    assign_loss_weights(samples)
    minis = split_mini_batches(samples, 2)
    assert [sorted({s.rollout_key for s in m}) for m in minis] == [["r0", "r2", "r4"], ["r1", "r3"]]
    for mini in minis:
        assert sum(s.loss_weight * len(s.response_ids) for s in mini) == pytest.approx(1.0)
    assert samples[0].loss_weight == pytest.approx(1 / (1 * 3 * 5))  # the originals are untouched
    assert split_mini_batches(samples, 1) == [samples]
    assert len(split_mini_batches(samples, 9)) == 5  # at most one mini-batch per rollout
    with pytest.raises(ValueError, match="mini_batches"):
        split_mini_batches(samples, 0)


def test_drop_stale_rollouts_drops_whole_rollouts_and_reweights_the_rest():
    from learner.batching import drop_stale_rollouts

    # r1's middle step was generated 2 versions back (its episode straddled a weight sync)
    versions = {"r0": (5, 5, 5), "r1": (5, 3, 5), "r2": (4, 4, 5), "r3": (5, 5, 5)}
    samples = [
        TrainSample([1, 2], [3] * n, [0.0] * n, 1.0, key, v, step=t)
        for key, vs in versions.items() for t, (v, n) in enumerate(zip(vs, (1, 2, 4)))
    ]
    assign_loss_weights(samples)
    kept, stats = drop_stale_rollouts(samples, version=5, max_staleness=1)
    assert stats == {"dropped_rollouts": 1.0, "dropped_samples": 3.0}
    assert [(s.rollout_key, s.step) for s in kept] == [(k, t) for k in ("r0", "r2", "r3") for t in range(3)]
    assert sum(s.loss_weight * len(s.response_ids) for s in kept) == pytest.approx(1.0)
    for s in kept:  # token mean per sample, mean over the rollout's 3 samples, mean over 3 kept rollouts
        assert s.loss_weight * len(s.response_ids) == pytest.approx(1 / (3 * 3))
    assert all(s.policy_version >= 4 for s in kept)

    fresh, none_dropped = drop_stale_rollouts(kept, version=5, max_staleness=2)
    assert fresh == kept and none_dropped == {"dropped_rollouts": 0.0, "dropped_samples": 0.0}
    gone, all_dropped = drop_stale_rollouts(samples, version=9, max_staleness=1)
    assert gone == [] and all_dropped == {"dropped_rollouts": 4.0, "dropped_samples": 12.0}
