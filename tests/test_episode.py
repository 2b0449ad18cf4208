"""EpisodeRunner over a scripted async `generate` (the fake sits at the edge: the engine).

The scripted engine reads the real prompt (decoded from the ids the runner sent) and answers with
the tokenizer's ids for a response text, so prompts, parsing, memory and records are all real.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from helpers_tokenizer import build_test_tokenizer

from finemem.config import MemoryConfig
from finemem.memory import FlatMemory, refusal_kind
from finemem.prompts import PromptBuilder
from finemem.records import Episode, Instance, OpResult, QAPair, StepSample
from finemem.toolcalls import render_tool_calls
from rollout.episode import TRUNCATED_REASON, EpisodeRunner, ResponseDecoder, request_seed
from rollout.summary import summarize_episodes
from rollout.types import Generation, SamplingSpec

CHUNK_RE = re.compile(r"Chunk (\d+)/(\d+):\n(.*?)<\|im_end\|>", re.DOTALL)


def make_instance(n_chunks: int = 3, iid: str = "inst") -> Instance:
    chunks = [f"Alice's pet number {t} is parrot{t}. The sky was grey." for t in range(1, n_chunks + 1)]
    return Instance(instance_id=iid, chunks=chunks, questions=[QAPair("What is Alice's pet?", ["parrot"])])


class ScriptedEngine:
    """An async generate: `respond(step, chunk, prompt_text) -> (text, finish_reason)`.

    Returns the tokenizer's ids of the text (+ eos when finished by "stop"), logprobs -0.5 each,
    and the current `version`. Records every request and the peak number in flight.
    """

    def __init__(self, tokenizer, respond, version: int = 7):
        self.tok = tokenizer
        self.respond = respond
        self.version = version
        self.requests: list[tuple[list[int], SamplingSpec]] = []
        self.in_flight = 0
        self.peak_in_flight = 0

    async def __call__(self, prompt_ids: list[int], params: SamplingSpec) -> Generation:
        self.requests.append((list(prompt_ids), params))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        await asyncio.sleep(0)  # let other episodes submit
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        prompt = self.tok.decode(prompt_ids, skip_special_tokens=False)
        m = CHUNK_RE.search(prompt)
        text, finish = self.respond(int(m.group(1)), m.group(3), prompt)
        ids = self.tok.encode(text, add_special_tokens=False)
        if finish == "stop":
            ids = ids + [self.tok.eos_token_id]
        return Generation(ids, [-0.5] * len(ids), finish, self.version)


def insert_first_sentence(step, chunk, prompt):
    return render_tool_calls([("memory_insert", {"content": chunk.split(". ")[0] + "."})]), "stop"


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


def make_runner(tok, engine, window=20, budget=1536, max_model_len=None, max_tokens=64, seed=None):
    builder = PromptBuilder(tok, MemoryConfig(window=window, prompt_budget=budget))
    return EpisodeRunner(
        engine, builder, "flat", "hermes", SamplingSpec(max_tokens=max_tokens, seed=seed),
        builder.count_tokens, max_model_len=max_model_len,
    )  # fmt: skip


def test_episode_records_exact_prompts_responses_and_stamped_memory(tok):
    engine = ScriptedEngine(tok, insert_first_sentence, version=7)
    runner = make_runner(tok, engine)
    inst = make_instance(3)
    ep = asyncio.run(runner.run_episode(inst, "e0", group_index=2))
    assert isinstance(ep, Episode) and ep.group_index == 2 and ep.error is None
    assert [s.step for s in ep.steps] == [1, 2, 3]
    builder = runner.prompt_builder
    before: list = []
    for s, (sent_ids, _) in zip(ep.steps, engine.requests):
        # the recorded prompt is what was sent, and what PromptBuilder renders for the memory before
        assert s.prompt_ids == sent_ids
        expected = builder.build(FlatMemory.restore(before), inst.chunks[s.step - 1], s.step, 3).ids
        assert s.prompt_ids == list(expected)
        assert s.response_ids[-1] == tok.eos_token_id and len(s.logprobs) == len(s.response_ids)
        assert s.ops == [OpResult("insert", True, "", f"m{s.step}")]
        assert s.policy_version == 7 and s.finish_reason == "stop"
        assert s.memory[-1].id == f"m{s.step}" and s.memory[-1].step == s.step
        assert s.memory[-1].content == f"Alice's pet number {s.step} is parrot{s.step}."
        assert [m.step for m in s.memory] == list(range(1, s.step + 1))  # older items keep their stamps
        assert s.memory_tokens == FlatMemory.restore(s.memory).token_length(builder.count_tokens) > 0
        assert {"prompt_s", "generate_s", "apply_s"} <= set(s.timings)
        before = s.memory


def test_truncated_and_malformed_responses_become_invalid_ops(tok):
    good = render_tool_calls([("memory_insert", {"content": "Alice has a parrot."})])
    script = {
        1: (good + "\nand then the model kept talk", "length"),  # complete call + cut tail
        2: (good[:-6], "length"),  # the call itself is cut: the parser reports it
        3: ("some words and no call at all", "length"),  # nothing complete: not a SKIP
        4: ('<tool_call>\n{"name": "memory_insert", "arguments": {"content": }\n</tool_call>', "stop"),
        5: ("", "stop"),  # an empty response is a SKIP
    }
    engine = ScriptedEngine(tok, lambda step, chunk, prompt: script[step])
    ep = asyncio.run(make_runner(tok, engine).run_episode(make_instance(5), "e"))
    ops = [s.ops for s in ep.steps]
    assert [o.op for o in ops[0]] == ["insert", "invalid"] and ops[0][0].valid
    assert ops[0][1] == OpResult("invalid", False, TRUNCATED_REASON)
    assert len(ops[1]) == 1 and not ops[1][0].valid and "unterminated" in ops[1][0].reason
    assert ops[2] == [OpResult("invalid", False, TRUNCATED_REASON)]
    assert len(ops[3]) == 1 and not ops[3][0].valid and "bad JSON" in ops[3][0].reason
    assert ops[4] == [OpResult("skip", True)]
    assert [s.finish_reason for s in ep.steps] == ["length"] * 3 + ["stop"] * 2
    assert [m.content for m in ep.final_memory] == ["Alice has a parrot."]


def test_memory_window_shrinks_to_the_budget_and_the_chunk_is_kept(tok):
    engine = ScriptedEngine(tok, insert_first_sentence)
    runner = make_runner(tok, engine, budget=10_000)
    full = asyncio.run(runner.run_episode(make_instance(6), "e"))
    last_full = full.steps[-1]
    assert last_full.timings["prompt_window"] == 5  # all five earlier items shown
    budget = len(last_full.prompt_ids) - 1  # the full window no longer fits at step 6
    engine2 = ScriptedEngine(tok, insert_first_sentence)
    small = asyncio.run(make_runner(tok, engine2, budget=budget).run_episode(make_instance(6), "e"))
    last = small.steps[-1]
    assert len(last.prompt_ids) <= budget and last.timings["prompt_window"] < 5
    text = tok.decode(last.prompt_ids, skip_special_tokens=False)
    assert make_instance(6).chunks[5] in text and "older items hidden" in text
    assert last.memory == last_full.memory  # same responses, same memory


def test_prompt_that_cannot_fit_the_model_is_an_invalid_step_not_a_request(tok):
    engine = ScriptedEngine(tok, insert_first_sentence, version=3)
    inst = make_instance(2)
    prompt_len = len(PromptBuilder(tok, MemoryConfig()).build(FlatMemory(), inst.chunks[0], 1, 2).ids)
    runner = make_runner(tok, engine, max_model_len=prompt_len + 63, max_tokens=64)
    ep = asyncio.run(runner.run_episode(inst, "e"))
    assert engine.requests == []
    for s in ep.steps:
        assert s.finish_reason == "prompt_too_long" and s.response_ids == [] and s.logprobs == []
        assert len(s.ops) == 1 and not s.ops[0].valid and "max_model_len" in s.ops[0].reason
        assert refusal_kind(s.ops[0].reason) == "prompt_too_long"
        assert s.memory == []
    ok = asyncio.run(
        make_runner(tok, engine, max_model_len=prompt_len + 64 + 20, max_tokens=64).run_episode(inst, "e")
    )
    assert ok.steps[0].ops[0].valid


def test_group_runs_concurrently_with_distinct_request_seeds(tok):
    engine = ScriptedEngine(tok, insert_first_sentence)
    runner = make_runner(tok, engine, seed=11)
    group = asyncio.run(runner.run_group(make_instance(3), 4, episode_ids=["a", "b", "c", "d"]))
    assert [e.episode_id for e in group] == ["a", "b", "c", "d"]
    assert [e.group_index for e in group] == [0, 1, 2, 3]
    assert all(len(e.steps) == 3 for e in group)
    assert engine.peak_in_flight == 4  # the four episodes' requests overlap
    seeds = [p.seed for _, p in engine.requests]
    assert len(set(seeds)) == 12 and request_seed(11, "a", 1) in seeds
    assert all(p.max_tokens == 64 for _, p in engine.requests)
    with pytest.raises(ValueError, match="episode ids"):
        asyncio.run(runner.run_group(make_instance(1), 2, episode_ids=["x"]))


def test_decoder_keeps_tool_call_markers_even_when_registered_as_special(tok):
    assert tok.convert_tokens_to_ids("<tool_call>") in tok.all_special_ids  # the hard case
    text = render_tool_calls([("memory_delete", {"memory_id": "m2"})])
    ids = [tok.convert_tokens_to_ids("<|im_start|>")] + tok.encode(text, add_special_tokens=False)
    ids += [tok.eos_token_id, tok.pad_token_id]
    assert ResponseDecoder(tok)(ids) == text


def test_summary_counts_ops_tokens_and_rates():
    inst = make_instance(2)

    def step(t, ops, n_resp, mem_tokens, finish="stop"):
        return StepSample(
            t, [1, 2, 3], list(range(n_resp)), [-1.0] * n_resp, "", ops, [], 0, finish, mem_tokens
        )

    ep1 = Episode("a", inst, 0, [step(1, [OpResult("insert", True), OpResult("invalid", False)], 10, 5),
                                 step(2, [OpResult("skip", True)], 1, 5)])  # fmt: skip
    ep2 = Episode("b", inst, 1, [step(1, [OpResult("update", False)], 4, 0, "length"),
                                 step(2, [OpResult("delete", True)], 5, 3)])  # fmt: skip
    s = summarize_episodes([ep1, ep2], wall_seconds=2.0)
    assert s["valid_call_rate"] == pytest.approx(3 / 5)
    assert s["ops_per_step"] == pytest.approx(5 / 4)
    assert s["ops_per_step/insert"] == pytest.approx(1 / 4) and s["ops_per_step/invalid"] == pytest.approx(
        1 / 4
    )
    assert s["memory_tokens_final"] == pytest.approx(4.0)
    assert s["gen_tokens"] == 20 and s["gen_tokens_per_s"] == pytest.approx(10.0)
    assert s["finish/length"] == pytest.approx(1 / 4) and s["finish/stop"] == pytest.approx(3 / 4)


def test_memalpha_memory_and_format(tok):
    """The runner drives Mem-alpha's memory with its own tool names and ✿FUNCTION✿ format."""

    def respond(step, chunk, prompt):
        calls = [("new_memory_insert", {"memory_type": "semantic", "content": chunk.split(". ")[0] + "."})]
        return render_tool_calls(calls, "memalpha"), "stop"

    builder = PromptBuilder(tok, MemoryConfig(kind="memalpha"), tool_format="memalpha")
    engine = ScriptedEngine(tok, respond)
    runner = EpisodeRunner(engine, builder, "memalpha", "memalpha", SamplingSpec(max_tokens=64))
    ep = asyncio.run(runner.run_episode(make_instance(2), "e"))
    assert [s.ops for s in ep.steps] == [[OpResult("insert", True, "", "s1")], [OpResult("insert", True, "", "s2")]]
    assert [(m.id, m.step) for m in ep.final_memory] == [("s1", 1), ("s2", 2)]
    assert "✿FUNCTION✿" in tok.decode(engine.requests[0][0], skip_special_tokens=False)  # the prompt asks for it
