"""Typed records that travel between the components (data -> rollout -> reward -> learner).

Every record is a plain dataclass with `to_dict` / `from_dict` so it can be written to jsonl,
sent through Ray, and read back without pickling surprises. Conventions used everywhere:

- Steps are numbered t = 1..T (the chunk index plus one). A memory item's `step` is the last
  step that wrote it; 0 never occurs in a real episode.
- Per-step arrays (rewards, components) are Python lists of length T where index 0 is t = 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

COMPETENCIES = (
    "accurate_retrieval",
    "test_time_learning",
    "long_range_understanding",
    "conflict_resolution",
)


def _from_dict(cls, d: dict[str, Any]):
    """Build `cls` from a dict, ignoring unknown keys (forward compatibility of saved files)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class QAPair:
    """A question and every acceptable gold answer (aliases)."""

    question: str
    answers: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answers": list(self.answers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QAPair:
        return cls(question=d["question"], answers=list(d["answers"]))


@dataclass
class Instance:
    """One memory-construction task: a chunk stream, its questions, and per-chunk QA.

    `chunk_qa[i]` are the K chunk-level QA pairs of chunk i (empty when the data has none;
    the chunk-level step reward is then 0 and logged as missing).
    """

    instance_id: str
    chunks: list[str]
    questions: list[QAPair]
    chunk_qa: list[list[QAPair]] = field(default_factory=list)
    data_source: str = "synthetic"
    competency: str = "accurate_retrieval"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.chunk_qa:
            self.chunk_qa = [[] for _ in self.chunks]
        if len(self.chunk_qa) != len(self.chunks):
            raise ValueError(
                f"instance {self.instance_id!r}: chunk_qa has {len(self.chunk_qa)} entries "
                f"but there are {len(self.chunks)} chunks"
            )

    @property
    def num_steps(self) -> int:
        return len(self.chunks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "chunks": list(self.chunks),
            "questions": [q.to_dict() for q in self.questions],
            "chunk_qa": [[q.to_dict() for q in qs] for qs in self.chunk_qa],
            "data_source": self.data_source,
            "competency": self.competency,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Instance:
        return cls(
            instance_id=str(d["instance_id"]),
            chunks=list(d["chunks"]),
            questions=[QAPair.from_dict(q) for q in d["questions"]],
            chunk_qa=[[QAPair.from_dict(q) for q in qs] for qs in d.get("chunk_qa") or []],
            data_source=d.get("data_source", "synthetic"),
            competency=d.get("competency", "accurate_retrieval"),
            metadata=dict(d.get("metadata") or {}),
        )


@dataclass
class MemoryItem:
    """One Fine-Mem memory item; `step` is the last step that wrote it (INSERT or UPDATE)."""

    id: str
    content: str
    step: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryItem:
        return _from_dict(cls, d)


@dataclass
class ToolCall:
    """One parsed function call from the model's text.

    `error` is None for a call that parsed into a name and an arguments dict; otherwise it says
    why the call could not be understood (it then counts as an invalid operation).
    """

    name: str
    arguments: dict[str, Any]
    raw: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToolCall:
        return _from_dict(cls, d)


@dataclass
class OpResult:
    """The outcome of applying one call to the memory.

    op: "insert" | "update" | "delete" | "skip" | "invalid" (the kind that was attempted; a call
    whose name is unknown or unparsable is "invalid"). `valid` is False with a `reason` when the
    environment refused it (unknown id, missing field, exact duplicate, ...).
    """

    op: str
    valid: bool
    reason: str = ""
    memory_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpResult:
        return _from_dict(cls, d)


@dataclass
class StepSample:
    """Everything the learner and the reward need about one (rollout, step) pair.

    `prompt_ids` / `response_ids` / `logprobs` are exactly the engine's token ids and sampling
    logprobs (never decoded and re-encoded). `memory` is the memory *after* the step's calls, with
    step stamps, which is what the chunk-level reward and evidence attribution read.
    """

    step: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    response_text: str
    ops: list[OpResult]
    memory: list[MemoryItem]
    policy_version: int = 0
    finish_reason: str = "stop"
    memory_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepSample:
        d = dict(d)
        d["ops"] = [OpResult.from_dict(o) for o in d.get("ops", [])]
        d["memory"] = [MemoryItem.from_dict(m) for m in d.get("memory", [])]
        return _from_dict(cls, d)


def episode_ids(group: str, size: int) -> list[str]:
    """The ids of a group's `size` rollouts: `<group>-g<i>` (`group_of` reads the group back)."""
    return [f"{group}-g{g}" for g in range(size)]


def group_of(episode_id: str) -> str:
    """The group an episode id belongs to: `s3-i1-g5` -> `s3-i1` (see `episode_ids`)."""
    return episode_id.rsplit("-g", 1)[0]


@dataclass
class Episode:
    """One rollout of the memory manager over one instance (member `group_index` of its group)."""

    episode_id: str
    instance: Instance
    group_index: int
    steps: list[StepSample] = field(default_factory=list)
    error: str | None = None
    # The training step whose batch sampled this episode (0 outside training). It seeds the global-
    # question subset with the run seed and the instance id, so a revisited instance is asked a fresh
    # 20% while the G rollouts of one group (same step) are still asked the same questions.
    train_step: int = 0

    @property
    def final_memory(self) -> list[MemoryItem]:
        return self.steps[-1].memory if self.steps else []

    @property
    def policy_versions(self) -> list[int]:
        return [s.policy_version for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {
            "episode_id": self.episode_id,
            "instance": self.instance.to_dict(),
            "group_index": self.group_index,
            "steps": [s.to_dict() for s in self.steps],
            "error": self.error,
            "train_step": self.train_step,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Episode:
        return cls(
            episode_id=d["episode_id"],
            instance=Instance.from_dict(d["instance"]),
            group_index=int(d.get("group_index", 0)),
            steps=[StepSample.from_dict(s) for s in d.get("steps", [])],
            error=d.get("error"),
            train_step=int(d.get("train_step", 0)),
        )


@dataclass
class EvidenceRecord:
    """One global question's retrieval log: what was shown to the answerer, and who wrote it."""

    question_index: int
    item_ids: list[str]
    item_steps: list[int]
    retrieval_scores: list[float]
    score: float
    answer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvidenceRecord:
        return _from_dict(cls, d)


@dataclass
class ScoredEpisode:
    """An episode with its per-step rewards `[T]`, their named components, and the evidence log."""

    episode: Episode
    rewards: list[float]
    components: dict[str, list[float]]
    evidence: list[EvidenceRecord]
    global_score: float
    stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "episode": self.episode.to_dict(),
            "rewards": list(self.rewards),
            "components": {k: list(v) for k, v in self.components.items()},
            "evidence": [e.to_dict() for e in self.evidence],
            "global_score": self.global_score,
            "stats": dict(self.stats),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoredEpisode:
        return cls(
            episode=Episode.from_dict(d["episode"]),
            rewards=list(d["rewards"]),
            components={k: list(v) for k, v in d["components"].items()},
            evidence=[EvidenceRecord.from_dict(e) for e in d.get("evidence", [])],
            global_score=float(d["global_score"]),
            stats=dict(d.get("stats") or {}),
        )
