"""Training-step metrics: op mix, per-step reward/advantage, component means."""

import pytest

from finemem.records import Episode, Instance, MemoryItem, OpResult, QAPair, ScoredEpisode, StepSample
from finemem.train_metrics import episode_metrics, invalid_reasons, op_mix, scored_metrics


def _episode(ops_per_step, memory_tokens=7):
    inst = Instance("i0", ["a", "b"], [QAPair("q", ["x"])])
    steps = [StepSample(step=t + 1, prompt_ids=[1], response_ids=[2, 3], logprobs=[-0.1, -0.2], response_text="",
                        ops=ops, memory=[MemoryItem("m1", "x", 1)], memory_tokens=memory_tokens)
             for t, ops in enumerate(ops_per_step)]
    return Episode("e0", inst, 0, steps)


def test_op_mix_counts_invalid_and_skip():
    ep = _episode([[OpResult("insert", True), OpResult("update", False, "unknown id")], [OpResult("skip", True)]])
    mix = op_mix([ep])
    assert mix["ops/insert"] == pytest.approx(1 / 3)
    assert mix["ops/invalid"] == pytest.approx(1 / 3)
    assert mix["ops/skip"] == pytest.approx(1 / 3)
    assert mix["ops/valid_call_rate"] == pytest.approx(2 / 3)


def test_invalid_reasons_counts_refusals_by_kind_largest_first():
    ep = _episode([
        [OpResult("insert", True), OpResult("insert", False, "exact duplicate of live item m1", "m1")],
        [OpResult("update", False, "unknown memory_id m9", "m9"), OpResult("insert", False, "exact duplicate of live item m2")],
        [OpResult("invalid", False, "response hit the token limit")],
    ])
    counts = invalid_reasons([ep])
    assert counts == {"duplicate": 2, "unknown_id": 1, "truncated": 1}
    assert list(counts) == ["duplicate", "unknown_id", "truncated"]
    assert invalid_reasons([_episode([[OpResult("skip", True)]])]) == {}
    m = episode_metrics([ep])
    assert m["ops_invalid/duplicate"] == pytest.approx(2 / 5) and m["ops_invalid/truncated"] == pytest.approx(1 / 5)


def test_scored_metrics_per_step_and_components():
    ep = _episode([[OpResult("insert", True)], [OpResult("skip", True)]])
    a = ScoredEpisode(ep, rewards=[1.0, 3.0], components={"chunk": [1.0, 0.0]}, evidence=[], global_score=0.5)
    b = ScoredEpisode(ep, rewards=[2.0, 5.0], components={"chunk": [0.0, 0.0]}, evidence=[], global_score=1.0)
    m = scored_metrics([a, b], advantages=[[1.0, -1.0], [-1.0, 1.0]])
    assert m["reward_by_step/1"] == pytest.approx(1.5)
    assert m["reward_by_step/2"] == pytest.approx(4.0)
    assert m["advantage_by_step/1"] == pytest.approx(0.0)
    assert m["reward/chunk"] == pytest.approx(0.25)
    assert m["qa/global_accuracy"] == pytest.approx(0.75)
    assert m["reward/return_mean"] == pytest.approx(5.5)
    assert m["memory/final_tokens"] == 7


def test_answerer_calls_and_cache_hit_rate_over_the_batch():
    ep = _episode([[OpResult("insert", True)]])
    stats = [{"answers": 30.0, "answer_cache_hits": 10.0}, {"answers": 10.0, "answer_cache_hits": 10.0}]
    scored = [ScoredEpisode(ep, rewards=[1.0], components={}, evidence=[], global_score=0.0, stats=s) for s in stats]
    m = scored_metrics(scored)
    assert m["answerer/requests_per_episode"] == pytest.approx(20.0)
    assert m["answerer/calls_per_episode"] == pytest.approx(10.0)
    assert m["answerer/cache_hit_rate"] == pytest.approx(0.5)  # 20 of 40 requests, not the mean of 1/3 and 1
