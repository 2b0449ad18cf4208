"""`RolloutActor`: an engine actor that also runs whole episodes (no Ray hop per step).

It is an `EngineActor` (one vLLM AsyncLLM: generate, pause/resume, update_weights, version) that
also owns the tokenizer, the `PromptBuilder` and an `EpisodeRunner` whose `generate` is the
actor's own coroutine. The trainer, `finemem rollout` and eval call `run_group` remotely; many
calls may be in flight at once (it is an async actor), and vLLM batches all their requests.

Create it with `create_rollout_actor(cfg, model_path, num_cpus=1)` (a Ray actor), or in-process
as `RolloutActor(model_path, spec, settings=...)` inside a running event loop; call `start()` first.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from finemem.records import Episode, Instance
from rollout.engine import EngineActor, EngineSpec
from rollout.types import SamplingSpec


@dataclass(frozen=True)
class RunnerSettings:
    """What the episode runner needs besides the engine (plain values: it travels to the actor)."""

    memory_kind: str = "flat"
    window: int = 20
    prompt_budget: int = 1536
    core_max_tokens: int = 512
    tool_format: str = "hermes"
    enable_thinking: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 192
    max_concurrent_episodes: int | None = 64

    @classmethod
    def from_config(cls, cfg) -> RunnerSettings:
        """From a resolved `FineMemConfig` (memory.*, model.tool_format/enable_thinking, rollout.*)."""
        return cls(
            memory_kind=str(cfg.memory.kind), window=int(cfg.memory.window),
            prompt_budget=int(cfg.memory.prompt_budget), core_max_tokens=int(cfg.memory.core_max_tokens),
            tool_format=str(cfg.model.tool_format), enable_thinking=bool(cfg.model.enable_thinking),
            temperature=float(cfg.rollout.temperature), top_p=float(cfg.rollout.top_p),
            max_tokens=int(cfg.rollout.max_response_tokens),
            max_concurrent_episodes=int(cfg.rollout.max_concurrent_episodes) or None,
        )  # fmt: skip

    def sampling(self) -> SamplingSpec:
        return SamplingSpec(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p)


class RolloutActor(EngineActor):
    """EngineActor + EpisodeRunner. `run_group` returns finished `Episode`s with exact engine tokens."""

    def __init__(
        self,
        model_path: str,
        spec: EngineSpec | None = None,
        initial_version: int = 0,
        settings: RunnerSettings | dict | None = None,
    ) -> None:
        super().__init__(model_path, spec, initial_version)
        if isinstance(settings, dict):
            settings = RunnerSettings(**settings)
        self.settings = settings or RunnerSettings()
        self.runner = None
        self.tokenizer = None

    async def start(self) -> dict[str, float]:
        """Start the engine, then build the tokenizer, prompt builder and episode runner."""
        timings = await super().start()
        from transformers import AutoTokenizer

        from finemem.config import MemoryConfig
        from finemem.prompts import PromptBuilder
        from rollout.episode import EpisodeRunner

        t0 = time.perf_counter()
        s = self.settings
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        memory_cfg = MemoryConfig(
            kind=s.memory_kind,
            window=s.window,
            prompt_budget=s.prompt_budget,
            core_max_tokens=s.core_max_tokens,
        )
        builder = PromptBuilder(self.tokenizer, memory_cfg, s.tool_format, s.enable_thinking)
        self.runner = EpisodeRunner(
            self.generate, builder, s.memory_kind, s.tool_format, s.sampling(), builder.count_tokens,
            max_model_len=self.spec.max_model_len, core_max_tokens=s.core_max_tokens,
            max_concurrent_episodes=s.max_concurrent_episodes, current_version=self.version,
        )  # fmt: skip
        timings["runner_setup_s"] = time.perf_counter() - t0
        return timings

    def settings_dict(self) -> dict[str, Any]:
        return asdict(self.settings)

    async def run_group(
        self,
        instance: Instance | dict,
        group_size: int,
        episode_ids: list[str] | None = None,
        sampling: SamplingSpec | dict | None = None,
    ) -> list[Episode]:
        """G episodes of one instance run concurrently on this engine; returned in group order.

        `sampling` overrides the settings' sampling for this group (a SamplingSpec or a dict of its
        fields); a `seed` there gives every (episode, step) request its own derived seed.
        """
        self._check_usable()
        if self.runner is None:
            raise RuntimeError("RolloutActor not started (call start())")
        inst = instance if isinstance(instance, Instance) else Instance.from_dict(instance)
        spec = self.runner.sampling if sampling is None else SamplingSpec.coerce(sampling)
        return await self.runner.run_group(inst, group_size, episode_ids, spec)

    async def replay(
        self, streams: list[list[tuple[list[int], int]]], params: SamplingSpec | dict | None = None
    ) -> dict[str, float]:
        """Raw engine generation for benchmarks: each stream is a list of (prompt ids, n tokens) sent
        one after another (like an episode's steps, without prompts, parsing or memory), streams
        concurrently. Exactly n tokens per request (eos ignored). Returns tokens and seconds."""
        self._check_usable()
        base = SamplingSpec.coerce(params)

        async def one(stream):
            n = 0
            for prompt, length in stream:
                spec = SamplingSpec(
                    max_tokens=int(length),
                    temperature=base.temperature,
                    top_p=base.top_p,
                    top_k=base.top_k,
                    seed=base.seed,
                    ignore_eos=True,
                )
                n += len((await self.generate(prompt, spec)).token_ids)
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(s) for s in streams if s))
        wall = time.perf_counter() - t0
        return {
            "tokens": float(sum(counts)),
            "wall_s": wall,
            "tokens_per_s": sum(counts) / wall if wall > 0 else 0.0,
        }


def create_rollout_actor(
    cfg,
    model_path: str | None = None,
    *,
    num_cpus: float = 1,
    num_gpus: float | None = None,
    initial_version: int = 0,
    **options,
):
    """Start a `RolloutActor` as an async Ray actor from a resolved config; call `.start.remote()` next.

    num_gpus defaults to the engine's tensor-parallel size when the config has GPUs, else 0.
    """
    import ray

    spec = EngineSpec.from_config(cfg)
    if num_gpus is None:
        num_gpus = spec.tensor_parallel_size if int(cfg.cluster.num_gpus) > 0 else 0
    settings = asdict(RunnerSettings.from_config(cfg))
    return (
        ray.remote(RolloutActor)
        .options(num_cpus=num_cpus, num_gpus=num_gpus, **options)
        .remote(str(model_path or cfg.model.path), spec, initial_version, settings)
    )
