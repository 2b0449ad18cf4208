"""The answerer request cache (reward/answer_cache.py): each distinct request is sent once, concurrent
identical requests share one call, failures are not cached, the bound holds, and with the
deterministic evidence reader the rewards of scored episodes are identical with the cache on and off.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from finemem.config import ConfigError, load_config
from finemem.data.synth import generate_instances
from finemem.records import Episode, MemoryItem, episode_ids, group_of
from finemem.teacher import TeacherNoise, teacher_episode
from reward.answer_cache import CachedAnswerer, count_requests, with_cache
from reward.answerers import AnswererError, EvidenceReader, OpenAIChatAnswerer
from reward.pool import pick_episode
from reward.scorer import score_episode_async

ITEMS = [MemoryItem("m1", "Ada lives in Paris", 1), MemoryItem("m2", "Bob works at Acme", 1)]


class SlowReader(EvidenceReader):
    """The evidence reader, but each call yields to the loop (as an HTTP request would), so
    concurrent identical requests overlap; it can be told to fail its next calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = 0

    async def answer(self, question, evidence, *, episode_id=None):
        self._calls += 1
        await asyncio.sleep(0.01)
        if self.fail_next:
            self.fail_next -= 1
            raise AnswererError("endpoint down", episode_id)
        return "\n".join(m.content for m in evidence)


def test_each_distinct_request_is_sent_once():
    inner = EvidenceReader()
    cache = CachedAnswerer(inner)

    async def run():
        a = await cache.answer("where does Ada live?", ITEMS)
        b = await cache.answer("where does Ada live?", list(ITEMS))  # equal evidence, new list
        c = await cache.answer("where does Ada live?", ITEMS[::-1])  # other order: another prompt
        d = await cache.answer("where does Bob work?", ITEMS)  # other question
        return a, b, c, d

    a, b, c, d = asyncio.run(run())
    assert d == a  # the reader answers with the evidence text, yet another question is another request
    assert a == b and a != c
    assert inner.metrics()["answer_calls"] == 3
    m = cache.metrics()
    assert (m["cache_requests"], m["cache_hits"], m["cache_entries"]) == (4, 1, 3)


def test_equal_evidence_under_other_ids_is_the_same_request():
    """The answerer sees the items' contents, not their ids (`format_evidence`): rollouts that stored
    the same facts under other ids send the same prompt."""
    inner = EvidenceReader()
    cache = CachedAnswerer(inner)
    other = [MemoryItem("m7", ITEMS[0].content, 3)]
    asyncio.run(cache.answer("q", ITEMS[:1]))
    asyncio.run(cache.answer("q", other))
    assert inner.metrics()["answer_calls"] == 1


def test_concurrent_identical_requests_share_one_call_and_count_per_context():
    inner = SlowReader()
    cache = CachedAnswerer(inner)

    async def run():
        with count_requests() as counts:
            answers = await asyncio.gather(*(cache.answer("q", ITEMS) for _ in range(5)))
        return answers, counts

    answers, counts = asyncio.run(run())
    assert len(set(answers)) == 1
    assert inner.metrics()["answer_calls"] == 1
    assert counts["cache_hits"] == 4


def test_a_failed_call_is_not_cached_and_every_waiter_sees_it():
    inner = SlowReader()
    inner.fail_next = 1
    cache = CachedAnswerer(inner)

    async def run():
        first = await asyncio.gather(*(cache.answer("q", ITEMS) for _ in range(3)), return_exceptions=True)
        second = await cache.answer("q", ITEMS)
        return first, second

    first, second = asyncio.run(run())
    assert all(isinstance(e, AnswererError) for e in first)
    assert second == "Ada lives in Paris\nBob works at Acme"
    assert inner.metrics()["answer_calls"] == 2  # the failure, then one retry by the next request


def test_the_cache_is_bounded_least_recently_used_first():
    inner = EvidenceReader()
    cache = CachedAnswerer(inner, max_entries=2)

    async def run():
        for q in ("a", "b", "a", "c", "a", "b"):  # "b" is evicted by "c" ("a" was used last)
            await cache.answer(q, ITEMS)

    asyncio.run(run())
    assert cache.metrics()["cache_entries"] == 2
    assert inner.metrics()["answer_calls"] == 4  # a, b, c, b again


def test_judges_are_cached_and_content_judge_only_where_the_answerer_has_one():
    reader = CachedAnswerer(EvidenceReader())
    assert not hasattr(reader, "judge_content")  # the memalpha preset check still refuses it
    assert reader.is_llm is False  # everything else passes through
    llm = CachedAnswerer(OpenAIChatAnswerer(load_config([]).reward.answerer))
    assert hasattr(llm, "judge_content") and llm.is_llm
    calls = []

    async def fake_judge(question, prediction, golds, *, episode_id=None):
        calls.append(question)
        return True

    reader.inner.judge = fake_judge  # the edge: count the judge's calls
    asyncio.run(reader.judge("q", "Paris", ["Paris"]))
    asyncio.run(reader.judge("q", "Paris", ["Paris"]))
    asyncio.run(reader.judge("q", "London", ["Paris"]))
    assert calls == ["q", "q"]


def test_config_switch_and_bound():
    cfg = load_config([])
    assert cfg.reward.answerer.cache is True
    assert isinstance(with_cache(EvidenceReader(), cfg.reward.answerer), CachedAnswerer)
    off = load_config(["reward.answerer.cache=false"])
    assert isinstance(with_cache(EvidenceReader(), off.reward.answerer), EvidenceReader)
    with pytest.raises(ConfigError, match="cache_max_entries"):
        load_config(["reward.answerer.cache_max_entries=0"])


def group_episodes(instances: int, group_size: int, seed: int = 5) -> list[Episode]:
    """Noisy-teacher groups: rollouts g and g+3 of a group write the same memory (one rng seed)."""
    noise = TeacherNoise(miss_fact=0.2, store_distractor=0.2, miss_update=0.3)
    out = []
    for i, inst in enumerate(generate_instances(instances, seed)):
        for g, eid in enumerate(episode_ids(f"s1-i{i}", group_size)):
            out.append(teacher_episode(inst, noise, random.Random(100 * i + g % 3), eid, g, train_step=1))
    return out


def test_rewards_are_identical_with_the_cache_on_and_off():
    """The evidence reader is deterministic: the cache may only change how many calls are sent."""
    cfg = load_config(["reward.preset=finemem"])
    episodes = group_episodes(instances=3, group_size=6)

    async def score(answerer):
        return [await score_episode_async(e, cfg, answerer) for e in episodes]

    off_reader, on_reader = EvidenceReader(), EvidenceReader()
    off = asyncio.run(score(off_reader))
    on = asyncio.run(score(CachedAnswerer(on_reader)))
    for a, b in zip(off, on, strict=True):
        assert a.rewards == b.rewards and a.components == b.components
        assert [e.to_dict() for e in a.evidence] == [e.to_dict() for e in b.evidence]
        assert a.stats["answers"] == b.stats["answers"] == a.stats["answer_calls"]
        assert b.stats["answer_calls"] + b.stats["answer_cache_hits"] == b.stats["answers"]
    sent_off = off_reader.metrics()["answer_calls"]
    sent_on = on_reader.metrics()["answer_calls"]
    assert sent_off == sum(s.stats["answers"] for s in off)
    assert sent_on == sum(s.stats["answer_calls"] for s in on)
    assert sent_on < sent_off / 2  # rollouts 0, 3 (and 1, 4; 2, 5) write the same memory


def test_pick_episode_keeps_a_group_on_its_actor_but_never_idles():
    homes = {"s1-i0": 0, "s1-i1": 1}
    assert pick_episode(["s1-i1", "s1-i0"], homes, slot=0) == 1  # its own group first
    assert pick_episode(["s1-i1", "s1-i2", "s1-i0"], homes, slot=0) == 2
    assert pick_episode(["s1-i1", "s1-i2"], homes, slot=0) == 1  # else a group nobody scores
    assert pick_episode(["s1-i1", "s1-i1"], homes, slot=0) == 0  # else steal rather than idle
    assert group_of(episode_ids("s12-i3", 8)[7]) == "s12-i3"
