"""Answer each distinct answerer request once: a request cache in front of any answerer.

Fine-Mem asks many questions twice. The G rollouts of a group often hold the same memory at early
steps, so they retrieve the same evidence for the same chunk question; a global question can be a
chunk question asked again of an unchanged memory; and an instance visited again asks again. On a
cluster every one of these is a request to a 32B answerer, the stage Mem-alpha's authors name as
their cost.

`CachedAnswerer` wraps an answerer (`reward.answerers`) and answers, judges and content-judges
through a bounded LRU keyed by the exact prompt the LLM would see (`answer_messages`,
`judge_messages`, `content_judge_messages`: question, retrieved evidence contents in retrieval
order (no item ids: they mean nothing to the answerer), golds) plus the generation settings that are not in the prompt (model, temperature, max tokens). One
cache belongs to one answerer, so a key never mixes endpoints. Concurrent identical requests share
one in-flight call; a failed call is not cached (every waiter gets the error, the next request tries
again). The EvidenceReader is keyed the same way, so its counts say what an LLM answerer would be sent.

Trade-off at temperature > 0: identical requests get one sampled answer instead of independent
samples. Within a group that removes answerer noise from the comparison of rollouts (equal evidence,
equal score), but a score is then one sample, not an average. `reward.answerer.cache=false` turns the
cache off; the evidence reader is deterministic, so there the rewards are identical either way.

Per-episode counts: the scorer opens a `count_requests()` context around one episode's calls; every
request made inside it (in any task the episode's gather starts) adds to that episode's counter.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

from finemem.records import MemoryItem
from reward.answerers import answer_messages, content_judge_messages, judge_messages

_EPISODE_COUNTS: contextvars.ContextVar[Counter[str] | None] = contextvars.ContextVar(
    "finemem_answer_counts", default=None
)


@contextmanager
def count_requests():
    """Count, for the requests made in this context (and the tasks it starts), `cache_hits`: those
    answered from the cache or by a call already in flight. Yields the Counter."""
    counts: Counter[str] = Counter()
    token = _EPISODE_COUNTS.set(counts)
    try:
        yield counts
    finally:
        _EPISODE_COUNTS.reset(token)


def _count(key: str) -> None:
    counts = _EPISODE_COUNTS.get()
    if counts is not None:
        counts[key] += 1


def request_key(kind: str, messages: list[dict[str, str]], settings: tuple) -> bytes:
    """One request's identity: a 128-bit digest of the call kind, the exact chat messages and the
    generation settings (a digest, not the prompt: 100k entries of short answers stay in tens of MB)."""
    text = json.dumps([kind, messages, list(settings)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def answerer_settings(answerer: Any) -> tuple:
    """What decides an answer besides the prompt: endpoint, model and sampling settings."""
    return tuple(getattr(answerer, name, None) for name in ("base_url", "model", "temperature", "max_tokens"))


class CachedAnswerer:
    """An answerer that sends each distinct request once (see the module docstring).

    Everything but `answer`, `judge` and `judge_content` (and the latter only where the wrapped
    answerer has it) passes through to the wrapped answerer, so `is_llm`, `chat` and friends behave
    as before."""

    def __init__(self, inner: Any, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"answer cache max_entries must be >= 1, got {max_entries}")
        self.inner = inner
        self.max_entries = int(max_entries)
        self.settings = answerer_settings(inner)
        self._done: OrderedDict[bytes, Any] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future] = {}
        self._counts: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        if name == "judge_content" and hasattr(self.inner, "judge_content"):
            return self._judge_content
        if name in ("inner", "_done", "_inflight", "_counts"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def answer(self, question: str, evidence: list[MemoryItem], *, episode_id: str | None = None) -> str:
        key = request_key("answer", answer_messages(question, evidence), self.settings)
        return await self._once(key, lambda: self.inner.answer(question, evidence, episode_id=episode_id))

    async def judge(
        self, question: str, prediction: str, golds: Sequence[str], *, episode_id: str | None = None
    ) -> bool:
        key = request_key("judge", judge_messages(question, prediction, golds), self.settings)
        return await self._once(key, lambda: self.inner.judge(question, prediction, golds, episode_id=episode_id))

    async def _judge_content(self, chunk: str, content: str, *, episode_id: str | None = None) -> bool:
        key = request_key("judge_content", content_judge_messages(chunk, content), self.settings)
        return await self._once(key, lambda: self.inner.judge_content(chunk, content, episode_id=episode_id))

    async def _once(self, key: bytes, call) -> Any:
        """The cached result of `key`, the result of the call in flight for it, or a new call."""
        self._counts["requests"] += 1
        if key in self._done:
            self._done.move_to_end(key)
            return self._hit(self._done[key])
        pending = self._inflight.get(key)
        if pending is not None:
            return self._hit(await asyncio.shield(pending))
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await call()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        else:
            future.set_result(result)
            self._done[key] = result
            if len(self._done) > self.max_entries:
                self._done.popitem(last=False)
            return result
        finally:
            del self._inflight[key]

    def _hit(self, result: Any) -> Any:
        self._counts["cache_hits"] += 1
        _count("cache_hits")
        return result

    def metrics(self) -> dict[str, float]:
        """The wrapped answerer's metrics plus `cache_requests`, `cache_hits`, `cache_entries`."""
        return {
            **self.inner.metrics(),
            "cache_requests": float(self._counts["requests"]),
            "cache_hits": float(self._counts["cache_hits"]),
            "cache_entries": float(len(self._done)),
        }

    async def close(self) -> None:
        await self.inner.close()


def with_cache(answerer: Any, cfg: Any) -> Any:
    """`answerer` behind a `CachedAnswerer` when `reward.answerer.cache` is on (`cfg` is that
    AnswererConfig), else `answerer` itself."""
    if not bool(getattr(cfg, "cache", False)):
        return answerer
    return CachedAnswerer(answerer, int(getattr(cfg, "cache_max_entries", 100_000)))
