"""The reward actor pool on a real local Ray: results match local scoring, each episode is returned
exactly once, a killed actor is replaced and its episode re-scored, scoring errors name the episode.

Heavy (starts Ray): `flock /tmp/finemem-heavy.lock .venv/bin/python -m pytest tests/test_reward_pool.py`.
"""

from __future__ import annotations

import random

import pytest

from finemem.config import load_config
from finemem.data.synth import generate_instances
from finemem.records import Episode, episode_ids
from finemem.teacher import TeacherNoise, teacher_episode
from reward.answerers import EvidenceReader
from reward.scorer import score_episode


def teacher_episodes(n: int, seed: int = 3) -> list[Episode]:
    """Episodes of the noisy scripted teacher on synthetic instances (two rollouts per instance)."""
    noise = TeacherNoise(miss_fact=0.3, store_distractor=0.3, miss_update=0.5, verbose=0.2)
    out = []
    for i, inst in enumerate(generate_instances((n + 1) // 2, seed)):
        for g in range(2):
            out.append(teacher_episode(inst, noise, random.Random(1000 * i + g), f"{inst.instance_id}/{g}", g))
    return out[:n]


def test_scoring_payload_round_trips_what_scoring_reads():
    from reward.pool import scoring_payload

    for e in teacher_episodes(4):
        e.steps[0].prompt_ids = [1, 2, 3]
        e.steps[0].logprobs = [-0.5]
        e.train_step = 6
        back = Episode.from_dict(scoring_payload(e))
        assert back.episode_id == e.episode_id and back.group_index == e.group_index
        assert back.train_step == 6  # it seeds the global-question sample inside the actor
        assert back.instance == e.instance
        assert [(s.step, s.ops, s.memory) for s in back.steps] == [(s.step, s.ops, s.memory) for s in e.steps]
        assert back.steps[0].prompt_ids == [] and back.steps[0].logprobs == []  # token payloads stay home


def test_memalpha_preset_without_llm_fails_before_starting_actors():
    from finemem.config import ConfigError
    from reward.pool import RewardPool

    with pytest.raises(ConfigError, match="reward.answerer.kind=openai"):
        RewardPool(load_config(["reward=memalpha"]), num_actors=1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from helpers_tokenizer import build_test_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_test_tokenizer().save_pretrained(path)
    return str(path)


def test_actor_counts_policy_tokens_as_evaluation_does(tokenizer_dir):
    """The compression term counts policy tokens (issue 12), not whitespace words. In-process actor."""
    from transformers import AutoTokenizer

    from finemem.config import to_container
    from finemem.memory import word_count
    from finemem.prompts import make_token_counter
    from reward.pool import RewardActor, scoring_payload
    from reward.scorer import memory_text

    cfg = load_config([])
    actor = RewardActor(to_container(cfg), tokenizer_path=tokenizer_dir)
    policy = make_token_counter(AutoTokenizer.from_pretrained(tokenizer_dir))
    episode = teacher_episodes(1)[0]
    text = memory_text(episode.final_memory)
    assert actor.count_tokens(text) == policy(text) != word_count(text)
    stats = actor.score(scoring_payload(episode))["stats"]
    assert stats["memory_tokens"] == policy(text)
    assert stats["chunk_tokens"] == sum(policy(c) for c in episode.instance.chunks)
    want = score_episode(episode, cfg, EvidenceReader(), count_tokens=policy).stats
    assert stats["compression"] == want["compression"]


def test_pool_refuses_two_token_counters(tokenizer_dir):
    from reward.pool import RewardPool

    with pytest.raises(ValueError, match="count_tokens or tokenizer_path"):
        RewardPool(load_config([]), num_actors=1, count_tokens=len, tokenizer_path=tokenizer_dir)


@pytest.mark.heavy
def test_pool_actors_count_policy_tokens(ray_local, tokenizer_dir):
    from transformers import AutoTokenizer

    from finemem.prompts import make_token_counter
    from reward.pool import RewardPool
    from reward.scorer import memory_text

    policy = make_token_counter(AutoTokenizer.from_pretrained(tokenizer_dir))
    p = RewardPool(load_config([]), num_actors=1, tokenizer_path=tokenizer_dir)
    try:
        for s in p.score_many(teacher_episodes(2)):
            assert s.stats["memory_tokens"] == policy(memory_text(s.episode.final_memory))
            assert s.stats["chunk_tokens"] == sum(policy(c) for c in s.episode.instance.chunks)
    finally:
        p.shutdown()


@pytest.fixture(scope="module")
def pool(ray_local):
    from reward.pool import RewardPool

    p = RewardPool(load_config([]), num_actors=2)
    yield p
    p.shutdown()


@pytest.mark.heavy
def test_results_match_local_scoring_and_come_once(pool):
    cfg = load_config([])
    episodes = teacher_episodes(10)
    expected = {e.episode_id: score_episode(e, cfg, EvidenceReader()) for e in episodes}
    got = list(pool.score_many(episodes))
    assert sorted(s.episode.episode_id for s in got) == sorted(expected)
    for s in got:
        want = expected[s.episode.episode_id]
        assert s.rewards == want.rewards
        assert s.components == want.components
        assert [e.to_dict() for e in s.evidence] == [e.to_dict() for e in want.evidence]
        assert s.episode is not None and len(s.rewards) == s.episode.instance.num_steps
    assert pool.pending == 0


@pytest.mark.heavy
def test_groups_stay_on_one_actor_and_each_request_is_sent_once(ray_local):
    """Two groups of 4 rollouts that write the same memory, on 2 actors: the rewards are those of
    uncached local scoring, and at most half the requests reach the answerer (each actor answers a
    distinct request once; a group split over both actors is the worst case, exactly half)."""
    from reward.pool import RewardPool

    cfg = load_config([])
    episodes = []
    for i, inst in enumerate(generate_instances(2, 8)):
        episodes += [teacher_episode(inst, TeacherNoise(), random.Random(i), eid, g)
                     for g, eid in enumerate(episode_ids(f"s1-i{i}", 4))]
    expected = {e.episode_id: score_episode(e, cfg, EvidenceReader()) for e in episodes}
    p = RewardPool(cfg, num_actors=2)
    try:
        got = list(p.score_many(episodes, backlog=len(episodes)))
        metrics = p.metrics()
    finally:
        p.shutdown()
    assert sorted(s.episode.episode_id for s in got) == sorted(expected)
    for s in got:
        assert s.rewards == expected[s.episode.episode_id].rewards
    requests = sum(s.stats["answers"] for s in got)
    assert metrics["cache_requests"] == requests
    assert metrics["answer_calls"] == sum(s.stats["answer_calls"] for s in got) <= requests / 2
    assert metrics["cache_hits"] == requests - metrics["answer_calls"]


@pytest.mark.heavy
def test_streaming_submit_and_poll(pool):
    episodes = teacher_episodes(6, seed=4)
    for e in episodes[:3]:
        pool.submit(e)
    got = []
    while pool.pending:
        got += pool.poll(timeout=None)
        if len(got) >= 1 and episodes[3:]:
            pool.submit(episodes.pop(3))
    assert sorted(s.episode.episode_id for s in got) == sorted(
        e.episode_id for e in teacher_episodes(6, seed=4)
    )


@pytest.mark.heavy
def test_killed_actor_is_replaced_and_nothing_is_lost(pool, ray_local):
    episodes = teacher_episodes(12, seed=5)
    before = pool.actors_replaced
    it = pool.score_many(episodes)
    got = [next(it)]
    # both actors have an episode in flight now (one per actor while the backlog is not empty)
    victim = pool.actors[0]
    ray_local.kill(victim, no_restart=True)
    got += list(it)
    ids = [s.episode.episode_id for s in got]
    assert len(ids) == len(set(ids)) == 12
    assert set(ids) == {e.episode_id for e in episodes}
    assert pool.actors_replaced == before + 1
    assert victim not in pool.actors and len(pool.actors) == 2
    assert pool.metrics()["actors_replaced"] == before + 1


@pytest.mark.heavy
def test_answer_failure_is_reported_with_the_episode_id(ray_local):
    import socket

    from reward.pool import EpisodeScoringError, RewardPool

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(
        ["reward.answerer.kind=openai", f"reward.answerer.base_url=http://127.0.0.1:{port}/v1",
         "reward.answerer.max_retries=1", "reward.answerer.backoff_s=0.01"]
    )  # fmt: skip
    p = RewardPool(cfg, num_actors=1)
    try:
        episode = teacher_episodes(1, seed=6)[0]
        with pytest.raises(EpisodeScoringError, match=f"episode {episode.episode_id}") as info:
            list(p.score_many([episode]))
        assert info.value.episode_id == episode.episode_id
        assert "failed after 2 attempts" in str(info.value)
    finally:
        p.shutdown()
