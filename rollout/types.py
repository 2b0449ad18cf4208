"""Small records of the engine's generate contract (no heavy imports, usable in pure unit tests).

`SamplingSpec` is what a caller asks for; `Generation` is what the engine returns for one request.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling knobs of one request. `temperature=0` is greedy; `top_k=0` and `top_p=1` disable them.

    `seed` makes one request's sampling reproducible; `stop` strings need detokenization
    (slower, and the stop text stays in the token ids); stopping on eos needs neither.
    """

    max_tokens: int = 192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"SamplingSpec.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingSpec.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingSpec.top_k must be >= 0 (0 = off), got {self.top_k}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def coerce(cls, value: SamplingSpec | dict[str, Any] | None) -> SamplingSpec:
        """A `SamplingSpec` from itself, a dict of its fields (unknown keys are an error) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"sampling params must be a SamplingSpec or a dict, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown sampling params {unknown} (known: {sorted(known)})")
        return cls(**value)


@dataclass
class Generation:
    """One finished request.

    token_ids: the sampled ids exactly as the engine produced them (an eos that stopped the request
      is included, with its logprob).
    logprobs: the sampling logprob of each chosen token (same length as token_ids), from the
      distribution that was actually sampled (temperature/top-p applied; see `EngineSpec.logprobs_mode`).
    finish_reason: "stop" (eos or stop string) | "length" | "abort".
    policy_version: the engine's policy version when the request was ADMITTED (requests that arrive
      while a weight update is in progress wait and are admitted under the new version).
    last_policy_version: the newest version that sampled any of its tokens. It differs from
      `policy_version` only for a request that was in flight across a weight update (pause mode
      "keep"): its later tokens, and their logprobs, come from the newer weights.
    version_spans: `[version, start, end)` runs over token indexes, as reported by vLLM.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int
    last_policy_version: int = -1
    version_spans: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Generation: {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs")
        if self.last_policy_version < 0:
            self.last_policy_version = self.policy_version

    @property
    def mixed_policy(self) -> bool:
        return self.last_policy_version != self.policy_version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
