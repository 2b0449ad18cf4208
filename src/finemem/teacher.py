"""The scripted teacher: the memory operations an ideal (or deliberately noisy) manager writes.

It reads the structured truth of a synthetic instance (`metadata["chunk_facts"]`, see
`finemem.data.synth`) and, for one chunk and the current memory, returns tool calls:
- a fact -> `memory_insert` of its canonical sentence "{Name}'s {attribute} is {value}.";
- an update -> `memory_update` of the item holding that (entity, attribute) (its content starts
  with "{Name}'s {attribute} is ") to the new canonical sentence, plus `memory_delete` of any older
  duplicates of the same pair; a `memory_insert` when no such item exists (the same rule is
  applied to a fact, so a memory that somehow already holds the pair is corrected, not duplicated);
- a distractor -> nothing.
The noisy teacher (SFT warm start) makes the mistakes RL should then fix, each with a probability:
`miss_fact` drops a fact or update altogether (the stale value, or nothing, stays),
`store_distractor` also stores a distractor verbatim, `miss_update` inserts the new value but
leaves the stale item, `verbose` appends a distractor sentence of the chunk to the stored content.
Calls follow the order of the chunk's sentences and are always valid operations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from finemem.data.synth import fact_prefix, fact_sentence
from finemem.memory import FlatMemory
from finemem.records import Episode, Instance, MemoryItem, OpResult, StepSample, ToolCall


@dataclass
class TeacherNoise:
    """Mistake probabilities of the scripted teacher (all 0: the ideal teacher)."""

    miss_fact: float = 0.0
    store_distractor: float = 0.0
    miss_update: float = 0.0
    verbose: float = 0.0

    def __post_init__(self) -> None:
        for name in ("miss_fact", "store_distractor", "miss_update", "verbose"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"TeacherNoise.{name} must be a probability in [0, 1], got {p}")

    @classmethod
    def from_sft(cls, sft_cfg) -> TeacherNoise:
        """From `config.SFTConfig` (its `teacher_*` knobs)."""
        return cls(
            miss_fact=float(sft_cfg.teacher_miss_fact),
            store_distractor=float(sft_cfg.teacher_store_distractor),
            miss_update=float(sft_cfg.teacher_miss_update),
            verbose=float(sft_cfg.teacher_verbose),
        )


def _chunk_records(instance: Instance, step: int) -> list[dict]:
    facts = instance.metadata.get("chunk_facts")
    if not isinstance(facts, list) or len(facts) != instance.num_steps:
        raise ValueError(
            f"instance {instance.instance_id!r}: metadata['chunk_facts'] must list the facts of each of its "
            f"{instance.num_steps} chunks (the scripted teacher only knows synthetic instances)"
        )
    if not 1 <= step <= instance.num_steps:
        raise ValueError(f"instance {instance.instance_id!r}: step {step} is outside 1..{instance.num_steps}")
    return facts[step - 1]


def _holders(items: list[MemoryItem], prefix: str) -> list[MemoryItem]:
    """Items whose content starts with the canonical prefix, most recently written first."""
    order = sorted(range(len(items)), key=lambda i: (items[i].step, i), reverse=True)
    return [items[i] for i in order if items[i].content.startswith(prefix)]


def teacher_calls(
    memory: FlatMemory, instance: Instance, step: int, noise: TeacherNoise, rng: random.Random
) -> list[tuple[str, dict]]:
    """The (tool name, arguments) calls for chunk `step` (1-based) given the memory before it."""
    records = _chunk_records(instance, step)
    items = memory.snapshot()
    live = {it.content for it in items}  # contents live after the calls so far (exact duplicates)
    distractors = [r["sentence"] for r in records if r["kind"] == "distractor"]
    calls: list[tuple[str, dict]] = []

    def content_for(sentence: str) -> str:
        if distractors and noise.verbose and rng.random() < noise.verbose:
            return f"{sentence} {rng.choice(distractors)}"
        return sentence

    def insert(content: str) -> None:
        if content not in live:
            live.add(content)
            calls.append(("memory_insert", {"content": content}))

    for r in records:
        if r["kind"] == "distractor":
            if noise.store_distractor and rng.random() < noise.store_distractor:
                insert(r["sentence"])
            continue
        if noise.miss_fact and rng.random() < noise.miss_fact:
            continue
        content = content_for(fact_sentence(r["entity"], r["attribute"], r["value"]))
        holders = _holders(items, fact_prefix(r["entity"], r["attribute"]))
        missed_update = r["kind"] == "update" and noise.miss_update and rng.random() < noise.miss_update
        if not holders or missed_update:
            insert(content)
            continue
        keep = next((h for h in holders if h.content == content), None)
        if keep is None:  # rewrite the most recent holder; content cannot be live (it has the prefix)
            keep = holders[0]
            live.discard(keep.content)
            live.add(content)
            calls.append(("memory_update", {"memory_id": keep.id, "new_content": content}))
        for old in holders:
            if old is keep:
                continue
            live.discard(old.content)
            calls.append(("memory_delete", {"memory_id": old.id}))
    return calls


def to_tool_calls(calls: list[tuple[str, dict]]) -> list[ToolCall]:
    """`ToolCall` records for the memory environment."""
    return [ToolCall(name=name, arguments=dict(args)) for name, args in calls]


@dataclass
class TeacherStep:
    """One step of a replayed teacher episode: what the policy would see and what it should write."""

    step: int
    memory_before: list[MemoryItem]
    next_id: int  # the memory's next id before the step (restore with `FlatMemory.restore(items, next_id)`)
    calls: list[tuple[str, dict]]
    results: list[OpResult]
    memory_after: list[MemoryItem]


def run_teacher_episode(instance: Instance, noise: TeacherNoise, rng: random.Random) -> list[TeacherStep]:
    """Replay the teacher over every chunk of `instance`, applying its calls to a fresh FlatMemory."""
    memory = FlatMemory()
    steps: list[TeacherStep] = []
    for step in range(1, instance.num_steps + 1):
        before, next_id = memory.snapshot(), memory.next_id
        calls = teacher_calls(memory, instance, step, noise, rng)
        results = memory.apply_all(to_tool_calls(calls), step)
        steps.append(TeacherStep(step, before, next_id, calls, results, memory.snapshot()))
    return steps


def teacher_episode(instance: Instance, noise: TeacherNoise, rng: random.Random, episode_id: str,
                    group_index: int = 0, train_step: int = 0) -> Episode:
    """`run_teacher_episode` as a scorable Episode: each step's ops and memory, no token payloads
    (what the reward scorer reads; tests and benchmarks score teacher rollouts with it)."""
    steps = [StepSample(s.step, [], [], [], "", s.results, s.memory_after)
             for s in run_teacher_episode(instance, noise, rng)]
    return Episode(episode_id, instance, group_index, steps, train_step=train_step)
