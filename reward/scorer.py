"""Score one finished episode: CSR for every step, global QA with its retrieval log, EARA, and the
reward composition of the configured preset (spec section 2).

All answerer calls of an episode (every chunk question of every step, every global question, the
content judge of Mem-alpha's preset) are gathered concurrently, so an HTTP answerer sees one
burst per episode and its concurrency limit does the pacing.

Scoring rules (see `finemem.rewards` for the maths):
- chunk QA of step t is answered from the top-k items of M_t (the step's snapshot) and scored with
  `reward.chunk_qa_metric` (factoid questions, whatever the instance's data source);
- global questions are a seeded sample (seed from `run.seed`, the instance id and the episode's
  `train_step`, so every rollout of a group gets the same ones and each training visit of an
  instance a new sample), answered from M_T and scored with the data source's metric
  (`reward.metric`, "auto" by source); `llm_judge` sources go through `answerer.judge`;
- each request goes to the answerer it is given; the reward actors give a `CachedAnswerer`, and
  the episode's stats say how many requests (`answers`) reached it and how many it sent
  (`answer_calls`);
- tokens(M_T) counts the final memory rendered as `[id] content` lines (as
  `FlatMemory.token_length`), with `count_tokens` (default: whitespace words).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from finemem import rewards
from finemem.config import ConfigError
from finemem.memory import word_count
from finemem.records import Episode, EvidenceRecord, MemoryItem, QAPair, ScoredEpisode
from finemem.retrieval import BM25Index
from finemem.scoring import metric_for_source, score_answer
from reward.answer_cache import count_requests
from reward.answerers import AnswererError

CountTokens = Callable[[str], int]


def memory_text(items: Sequence[MemoryItem]) -> str:
    """The memory as `[id] content` lines (what tokens(M_T) counts)."""
    return "\n".join(f"[{m.id}] {m.content}" for m in items)


def check_answerer_for_preset(preset: str, answerer: Any) -> None:
    """Mem-alpha's preset needs an LLM content judge; fail early with a config error otherwise."""
    if "content" in rewards.preset_components(preset) and not hasattr(answerer, "judge_content"):
        raise ConfigError(
            f"reward.preset={preset!r} needs an LLM content judge, but the answerer "
            f"{type(answerer).__name__} has none: set reward.answerer.kind=openai (and its base_url)"
        )


class _EpisodeScorer:
    """The state of scoring one episode (one instance per call of `score_episode_async`)."""

    def __init__(self, episode: Episode, cfg: Any, answerer: Any, count_tokens: CountTokens) -> None:
        self.episode = episode
        self.instance = episode.instance
        self.cfg = cfg
        self.answerer = answerer
        self.count_tokens = count_tokens
        self.top_k = int(cfg.retrieval.top_k)
        self.failure_scores_zero = bool(cfg.reward.answerer.failure_scores_zero)
        self.failures = 0
        self.answers = 0

    async def _safe(self, coro, default):
        """Await an answerer call; on AnswererError either re-raise or (if configured) use `default`."""
        self.answers += 1
        try:
            return await coro
        except AnswererError as e:
            if e.episode_id is None:
                e.episode_id = self.episode.episode_id
            if not self.failure_scores_zero:
                raise
            self.failures += 1
            return default

    async def chunk_question(self, index: BM25Index, qa: QAPair) -> float:
        hits = index.search(qa.question, self.top_k)
        pred = await self._safe(
            self.answerer.answer(qa.question, [m for m, _ in hits], episode_id=self.episode.episode_id), None
        )
        if pred is None:
            return 0.0
        return score_answer(
            pred, qa.answers, self.instance.data_source, metric=str(self.cfg.reward.chunk_qa_metric)
        )

    async def step_chunk_scores(self, t: int) -> list[float]:
        qas = self.instance.chunk_qa[t - 1]
        if not qas:
            return []
        index = BM25Index(self.episode.steps[t - 1].memory)
        return list(await asyncio.gather(*(self.chunk_question(index, qa) for qa in qas)))

    async def global_question(self, index: BM25Index, j: int) -> EvidenceRecord:
        qa = self.instance.questions[j]
        hits = index.search(qa.question, self.top_k)
        evidence = [m for m, _ in hits]
        eid = self.episode.episode_id
        pred = await self._safe(self.answerer.answer(qa.question, evidence, episode_id=eid), None)
        score = 0.0
        if pred is not None:
            metric = str(self.cfg.reward.metric)
            name = metric_for_source(self.instance.data_source) if metric == "auto" else metric
            if name == "llm_judge":
                verdict = await self._safe(
                    self.answerer.judge(qa.question, pred, qa.answers, episode_id=eid), False
                )
                score = float(bool(verdict))
            else:
                score = score_answer(
                    pred, qa.answers, self.instance.data_source, metric=metric, question=qa.question
                )
        return EvidenceRecord(
            question_index=j,
            item_ids=[m.id for m in evidence],
            item_steps=[m.step for m in evidence],
            retrieval_scores=[s for _, s in hits],
            score=score,
            answer=pred or "",
        )

    async def step_content(self, t: int) -> float:
        """Mem-alpha r_content(t): the judge over the step's valid inserts/updates, 0 for other calls."""
        step = self.episode.steps[t - 1]
        calls = [op for op in step.ops if op.op != "skip"]
        if not calls:
            return rewards.content_reward([], skip_score=0.0)
        by_id = {m.id: m for m in step.memory}
        chunk = self.instance.chunks[t - 1]

        async def one(op) -> float:
            if op.op not in ("insert", "update") or not op.valid or op.memory_id not in by_id:
                return 0.0
            ok = await self._safe(
                self.answerer.judge_content(
                    chunk, by_id[op.memory_id].content, episode_id=self.episode.episode_id
                ),
                False,
            )
            return float(bool(ok))

        return rewards.content_reward(list(await asyncio.gather(*(one(op) for op in calls))))


def _check_episode(episode: Episode) -> int:
    T = len(episode.steps)
    if episode.error:
        raise ValueError(
            f"episode {episode.episode_id}: cannot score an episode that failed: {episode.error}"
        )
    if T != episode.instance.num_steps or T == 0:
        raise ValueError(
            f"episode {episode.episode_id}: {T} steps recorded but instance "
            f"{episode.instance.instance_id!r} has {episode.instance.num_steps} chunks"
        )
    for i, s in enumerate(episode.steps):
        if s.step != i + 1:
            raise ValueError(f"episode {episode.episode_id}: steps[{i}].step is {s.step}, expected {i + 1}")
    return T


async def score_episode_async(
    episode: Episode, cfg: Any, answerer: Any, count_tokens: CountTokens | None = None
) -> ScoredEpisode:
    """Per-step rewards [T], their components and the evidence log of one finished episode.

    `cfg` is the full `FineMemConfig` (reads `reward`, `retrieval.top_k`, `run.seed`).
    Raises `AnswererError` (with the episode id) when an answer request fails after its retries,
    unless `reward.answerer.failure_scores_zero` is set.
    """
    start = time.perf_counter()
    T = _check_episode(episode)
    preset = str(cfg.reward.preset)
    needed = rewards.preset_components(preset)
    check_answerer_for_preset(preset, answerer)
    count = count_tokens or word_count
    sc = _EpisodeScorer(episode, cfg, answerer, count)
    inst = episode.instance

    seed = rewards.derive_seed(int(cfg.run.seed), inst.instance_id, int(episode.train_step))
    asked = rewards.sample_global_questions(
        len(inst.questions), float(cfg.reward.global_question_fraction), seed
    )
    final_index = BM25Index(episode.final_memory)

    chunk_jobs = [sc.step_chunk_scores(t) for t in range(1, T + 1)] if "chunk" in needed else []
    content_jobs = [sc.step_content(t) for t in range(1, T + 1)] if "content" in needed else []
    global_jobs = [sc.global_question(final_index, j) for j in asked]
    with count_requests() as counts:  # the gather's tasks copy this context: they count here
        results = await asyncio.gather(*chunk_jobs, *content_jobs, *global_jobs)
    chunk_scores: list[list[float]] = list(results[: len(chunk_jobs)])
    content = list(results[len(chunk_jobs) : len(chunk_jobs) + len(content_jobs)])
    evidence: list[EvidenceRecord] = list(results[len(chunk_jobs) + len(content_jobs) :])

    q_scores = [e.score for e in evidence]
    attribution = rewards.eara(q_scores, [e.item_steps for e in evidence], T, float(cfg.reward.beta))
    skip_score = float(cfg.reward.skip_format_score)
    fmt = [rewards.format_reward(s.ops, skip_score) for s in episode.steps]
    memory_tokens = count(memory_text(episode.final_memory))
    chunk_tokens = sum(count(c) for c in inst.chunks)
    comp = rewards.compression_reward(memory_tokens, chunk_tokens)
    chunk = [rewards.chunk_reward(s) for s in chunk_scores] if chunk_jobs else None

    breakdown = rewards.compose(
        preset,
        rewards.RewardInputs(
            format=fmt,
            r_global=attribution.r_global,
            compression=comp,
            chunk=chunk,
            eara=attribution.rewards,
            content=content or None,
        ),
        rewards.RewardWeights(
            chunk=float(cfg.reward.chunk_weight),
            compression=float(cfg.reward.compression_weight),
            content=float(cfg.reward.content_weight),
        ),
    )
    stats = {
        "r_global": attribution.r_global,
        "num_global_questions": float(len(asked)),
        "eara_no_evidence_share": attribution.no_evidence_share,
        "format_mean": sum(fmt) / T,
        "compression": comp,
        "memory_tokens": float(memory_tokens),
        "chunk_tokens": float(chunk_tokens),
        "answers": float(sc.answers),
        # requests the answerer was actually sent: the rest were answered by reward/answer_cache.py
        "answer_calls": float(sc.answers - counts["cache_hits"]),
        "answer_cache_hits": float(counts["cache_hits"]),
        "answer_failures": float(sc.failures),
        "return": float(sum(breakdown.rewards)),
    }
    if chunk is not None:
        stats["chunk_mean"] = sum(chunk) / T
        stats["chunk_qa_missing_steps"] = float(sum(1 for qas in inst.chunk_qa if not qas))
    if content:
        stats["content_mean"] = sum(content) / T
    stats["score_time_s"] = time.perf_counter() - start
    return ScoredEpisode(
        episode=episode,
        rewards=breakdown.rewards,
        components=breakdown.components,
        evidence=evidence,
        global_score=attribution.r_global,
        stats=stats,
    )


def score_episode(
    episode: Episode, cfg: Any, answerer: Any, count_tokens: CountTokens | None = None
) -> ScoredEpisode:
    """Synchronous `score_episode_async` on a fresh event loop; closes the answerer's connections
    at the end (they belong to that loop). Use the async version inside a running loop."""

    async def run() -> ScoredEpisode:
        try:
            return await score_episode_async(episode, cfg, answerer, count_tokens)
        finally:
            await answerer.close()

    return asyncio.run(run())
