"""The memory managers `finemem eval` compares (`eval.manager=`): each turns instances into the memory
the answerer then reads.

- `policy`: a Hugging Face folder (`model.path`) on the vLLM engine actors, the trainer's path.
- `openai`: any OpenAI-compatible chat endpoint (`eval.endpoint`) as the manager. Each step sends the
  same two messages the policy sees (`prompts.build_messages`: system prompt with the tool schemas,
  memory window and chunk; the server applies its own chat template), parses the reply with the same
  tool-call parser and applies it to the same memory. With no tokenizer at hand the window is not
  fitted in advance: a reply "prompt too long" (HTTP 400) halves the window and asks again, and a step
  that does not fit even with no memory shown is recorded as not prompted, as the engine does.
- `rag`: no manager. The raw chunks are the store; the answerer reads BM25 top-k chunks.
- `long_context`: no manager. The answerer reads the newest context that fits `eval.context_tokens`
  (whitespace words), cut from the oldest end at sentence boundaries.
- `teacher`: the scripted (ideal) teacher, on synthetic instances.

Every builder returns one `BuiltMemory` per (instance, sample) plus the episodes it ran, if any.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from finemem.config import ConfigError
from finemem.memory import make_memory, word_count
from finemem.model_init import model_folder_problem
from finemem.records import Episode, Instance, MemoryItem, OpResult, StepSample

EVIDENCE_BM25 = "bm25"  # the answerer reads the top-k items for the question
EVIDENCE_ALL = "all"  # the answerer reads every item (long context)


@dataclass
class BuiltMemory:
    """What the answerer searches for one (instance, sample), and how it searches it."""

    instance: Instance
    sample: int
    items: list[MemoryItem]
    evidence: str = EVIDENCE_BM25
    top_k: int = 2
    episode: Episode | None = None
    construction_s: float = 0.0
    manager_calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_tokens(self) -> int:
        """Whitespace words of the memory as the answerer sees it rendered (`[id] content` lines)."""
        return word_count("\n".join(f"[{m.id}] {m.content}" for m in self.items))


def chunk_items(chunks: Sequence[str]) -> list[MemoryItem]:
    """Raw chunks as items `c1..cT` (step = the chunk's position), for the no-manager baselines."""
    return [MemoryItem(f"c{i}", chunk, i) for i, chunk in enumerate(chunks, start=1)]


def newest_context(chunks: Sequence[str], budget: int) -> list[MemoryItem]:
    """The newest part of the context within `budget` whitespace words, cut from the oldest end.

    Whole chunks from the newest back; the chunk that does not fit keeps its newest sentences that do
    (a sentence is never cut). Items keep the original order and chunk ids.
    """
    from finemem.data.readers import split_sentences

    kept: list[MemoryItem] = []
    left = budget
    for i in range(len(chunks), 0, -1):
        text = chunks[i - 1]
        n = word_count(text)
        if n <= left:
            kept.append(MemoryItem(f"c{i}", text, i))
            left -= n
            continue
        tail: list[str] = []
        for sentence in reversed(split_sentences(text)):
            m = word_count(sentence)
            if m > left:
                break
            tail.insert(0, sentence)
            left -= m
        if tail:
            kept.append(MemoryItem(f"c{i}", "\n".join(tail), i))
        break
    return list(reversed(kept))


# ---------------------------------------------------------------------------------------------
# No-manager baselines and the scripted teacher
# ---------------------------------------------------------------------------------------------


def build_rag(instances: Sequence[Instance], cfg) -> list[BuiltMemory]:
    k = int(cfg.eval.rag_top_k) or int(cfg.retrieval.top_k)
    return [BuiltMemory(inst, 0, chunk_items(inst.chunks), EVIDENCE_BM25, k) for inst in instances]


def build_long_context(instances: Sequence[Instance], cfg) -> list[BuiltMemory]:
    budget = int(cfg.eval.context_tokens)
    if budget < 1:
        raise ConfigError(f"eval.context_tokens={budget}: long_context needs a budget of at least 1 word")
    return [BuiltMemory(inst, 0, newest_context(inst.chunks, budget), EVIDENCE_ALL, 0) for inst in instances]


def check_teacher_data(instances: Sequence[Instance], path: str) -> None:
    for inst in instances:
        facts = inst.metadata.get("chunk_facts")
        if not isinstance(facts, list) or len(facts) != inst.num_steps:
            raise ConfigError(f"{path}: instance {inst.instance_id}: field 'metadata.chunk_facts' is missing; "
                              "eval.manager=teacher replays the scripted teacher, which knows synthetic data only "
                              "(`finemem data synth`)")


def build_teacher(instances: Sequence[Instance], cfg) -> list[BuiltMemory]:
    """The ideal scripted teacher's episode per instance (deterministic: one sample)."""
    import random

    from finemem.teacher import TeacherNoise, run_teacher_episode

    out = []
    for inst in instances:
        t0 = time.perf_counter()
        steps = run_teacher_episode(inst, TeacherNoise(), random.Random(int(cfg.run.seed)))
        samples = [StepSample(step=s.step, prompt_ids=[], response_ids=[], logprobs=[], response_text="",
                              ops=s.results, memory=s.memory_after, finish_reason="stop") for s in steps]
        episode = Episode(episode_id=f"teacher-{inst.instance_id}", instance=inst, group_index=0, steps=samples)
        out.append(BuiltMemory(inst, 0, episode.final_memory, EVIDENCE_BM25, int(cfg.retrieval.top_k), episode,
                               time.perf_counter() - t0))
    return out


# ---------------------------------------------------------------------------------------------
# An OpenAI-compatible endpoint as the manager
# ---------------------------------------------------------------------------------------------

_TOO_LONG = re.compile(r"context length|maximum model length|too long|too large|reduce the length", re.IGNORECASE)


def is_prompt_too_long(err: BaseException) -> bool:
    """A 400/413 reply saying the prompt (plus max_tokens) does not fit the model's context."""
    text = str(err)
    return bool(re.search(r"HTTP (400|413)\b", text)) and bool(_TOO_LONG.search(text))


class OpenAIManager:
    """Episodes of a chat endpoint acting as the memory manager (see the module docstring)."""

    def __init__(self, cfg, client: Any = None) -> None:
        from reward.answerers import OpenAIChatAnswerer

        self.cfg = cfg
        self.client = client or OpenAIChatAnswerer(cfg.eval.endpoint)
        self.memory_kind = str(cfg.memory.kind)
        self.tool_format = str(cfg.model.tool_format)
        self.calls: dict[str, int] = {}  # requests sent per episode id

    async def run_episode(self, instance: Instance, episode_id: str, sample: int = 0) -> Episode:
        memory = make_memory(self.memory_kind, core_max_tokens=int(self.cfg.memory.core_max_tokens),
                             count_tokens=word_count)
        steps = [await self._step(memory, instance, t, episode_id) for t in range(1, instance.num_steps + 1)]
        return Episode(episode_id=episode_id, instance=instance, group_index=sample, steps=steps)

    async def _step(self, memory, instance: Instance, t: int, episode_id: str) -> StepSample:
        from finemem.prompts import build_messages
        from finemem.toolcalls import parse_tool_calls
        from rollout.episode import FINISH_PROMPT_TOO_LONG, truncated_ops

        t0 = time.perf_counter()
        window = min(int(self.cfg.memory.window), len(memory))
        while True:
            messages = build_messages(memory, instance.chunks[t - 1], t, instance.num_steps, self.cfg.memory,
                                      self.tool_format, window=window, memory_kind=self.memory_kind)
            self.calls[episode_id] = self.calls.get(episode_id, 0) + 1
            try:
                reply = await self.client.chat_reply(messages, episode_id=episode_id)
                break
            except Exception as err:  # an AnswererError; only "prompt too long" is handled here
                if not is_prompt_too_long(err):
                    raise
                if window > 0:
                    window //= 2
                    continue
                reason = f"prompt does not fit the endpoint's context even with no memory shown ({err})"
                return StepSample(step=t, prompt_ids=[], response_ids=[], logprobs=[], response_text="",
                                  ops=[OpResult("invalid", False, reason[:300])], memory=memory.snapshot(),
                                  finish_reason=FINISH_PROMPT_TOO_LONG, memory_tokens=memory.token_length(word_count),
                                  timings={"generate_s": time.perf_counter() - t0, "prompt_window": 0.0})
        calls = parse_tool_calls(reply.text)
        ops = memory.apply_all(calls, t) if calls or reply.finish_reason == "stop" else []
        if reply.finish_reason != "stop":
            ops = truncated_ops(calls, ops)
        return StepSample(step=t, prompt_ids=[], response_ids=[], logprobs=[], response_text=reply.text, ops=ops,
                          memory=memory.snapshot(), finish_reason=reply.finish_reason,
                          memory_tokens=memory.token_length(word_count),
                          timings={"generate_s": time.perf_counter() - t0, "prompt_window": float(window)})

    async def close(self) -> None:
        await self.client.close()


def build_openai(instances: Sequence[Instance], cfg, samples: int, client: Any = None) -> list[BuiltMemory]:
    """`samples` episodes per instance through the endpoint; episodes run concurrently (the client's
    `eval.endpoint.concurrency` bounds the requests in flight)."""
    manager = OpenAIManager(cfg, client)

    async def one(inst: Instance, g: int) -> BuiltMemory:
        t0 = time.perf_counter()
        episode = await manager.run_episode(inst, f"eval-openai-{inst.instance_id}-g{g}", g)
        return BuiltMemory(inst, g, episode.final_memory, EVIDENCE_BM25, int(cfg.retrieval.top_k), episode,
                           time.perf_counter() - t0, manager.calls.get(episode.episode_id, 0))

    async def run() -> list[BuiltMemory]:
        try:
            return list(await asyncio.gather(*(one(inst, g) for inst in instances for g in range(samples))))
        finally:
            await manager.close()

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# The policy on vLLM engine actors
# ---------------------------------------------------------------------------------------------


def check_model_folder(path: str) -> None:
    """A manager that runs a local model needs a Hugging Face folder (config.json, tokenizer, weights)."""
    problem = model_folder_problem(path)
    if problem:
        raise ConfigError(f"eval.manager=policy needs a model folder (--model DIR or model.path): {problem}")


def build_policy(instances: Sequence[Instance], cfg, samples: int) -> list[BuiltMemory]:
    """The trainer's held-out path: engines on a local Ray, `samples` episodes per instance."""
    import ray

    from learner.evaluate import run_on_engines
    from learner.ray_env import child_env
    from rollout.actor import create_rollout_actor
    from rollout.episode import FINISH_PROMPT_TOO_LONG

    ray.init(num_cpus=cfg.cluster.num_cpus or 4, include_dashboard=False, runtime_env={"env_vars": child_env()},
             log_to_driver=False)
    try:
        t0 = time.perf_counter()
        engines = [create_rollout_actor(cfg, cfg.model.path, num_cpus=cfg.rollout.actor_num_cpus)
                   for _ in range(cfg.rollout.num_engines)]
        ray.get([e.start.remote() for e in engines])
        start_s = time.perf_counter() - t0
        sampling = {"max_tokens": cfg.rollout.max_response_tokens, "temperature": cfg.eval.temperature,
                    "top_p": cfg.rollout.top_p, "seed": int(cfg.run.seed)}  # as the trainer's eval
        t1 = time.perf_counter()
        episodes = run_on_engines(engines, instances, samples, sampling, label="eval")
        run_s = time.perf_counter() - t1
    finally:
        ray.shutdown()
    per = run_s / max(1, len(episodes))  # episodes run concurrently: their mean share of the wall time
    out = []
    for ep in episodes:
        calls = sum(1 for s in ep.steps if s.finish_reason != FINISH_PROMPT_TOO_LONG)  # requests sent
        out.append(BuiltMemory(ep.instance, ep.group_index, ep.final_memory, EVIDENCE_BM25,
                               int(cfg.retrieval.top_k), ep, per, calls, {"engine_start_s": start_s}))
    return out
