"""Prompt building: system prompt, token ids equal the template text, window shrinks to the budget."""

from __future__ import annotations

import copy
import json

import pytest
from helpers_tokenizer import build_test_tokenizer

from finemem.config import MemoryConfig
from finemem.memory import FlatMemory, MemAlphaMemory
from finemem.prompts import PromptBuilder, build_messages, make_token_counter, system_prompt, user_message
from finemem.records import ToolCall

CHUNK = "Mira changed her locker code to 5930. The weather was pleasant."


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


def flat_memory(n: int) -> FlatMemory:
    mem = FlatMemory()
    for i in range(n):
        assert mem.apply(ToolCall("memory_insert", {"content": f"Fact {i}: Omar's favourite colour is green."}), i + 1).valid
    return mem


def encode(tok, text):
    return tok(text, add_special_tokens=False).input_ids


# ---- system prompt --------------------------------------------------------------------------
def test_system_prompt_lists_the_tools_of_the_memory_kind_in_the_call_format():
    flat = system_prompt("flat", "hermes")
    assert "<tool_call>" in flat and "✿FUNCTION✿" not in flat
    assert all(name in flat for name in ("memory_insert", "memory_update", "memory_delete"))
    tool_lines = flat.split("Tools:\n", 1)[1].splitlines()  # one compact JSON schema per line
    assert [json.loads(line)["name"] for line in tool_lines] == ["memory_insert", "memory_update", "memory_delete"]
    mem_alpha = system_prompt("memalpha", "memalpha")
    assert "✿FUNCTION✿" in mem_alpha and "new_memory_insert" in mem_alpha and "core" in mem_alpha
    full = system_prompt("flat", "hermes", style="full")
    assert '"description"' in full and len(full) > len(flat)
    with pytest.raises(ValueError, match="unknown prompt style"):
        system_prompt("flat", "hermes", style="long")
    with pytest.raises(ValueError, match="unknown tool format"):
        system_prompt("flat", "xml")


def test_user_message_shows_memory_then_the_chunk():
    assert user_message(FlatMemory(), "c", 1, 4, 20) == "Memory: (empty)\nChunk 1/4:\nc"
    mem = flat_memory(3)
    assert user_message(mem, "c", 2, 4, 2).startswith("Memory (1 older items hidden):\n[m2] Fact 1")
    assert user_message(mem, "c", 2, 4, 0) == "Memory (3 older items hidden):\nChunk 2/4:\nc"
    assert user_message(mem, "c", 2, 4, 3) == "Memory:\n" + mem.render(3) + "\nChunk 2/4:\nc"


def test_module_build_messages_matches_the_builder(tok):
    mem = flat_memory(4)
    cfg = MemoryConfig(window=3, prompt_budget=100000)
    messages = build_messages(mem, CHUNK, 2, 4, cfg, "hermes")
    assert messages == PromptBuilder(tok, cfg).build_messages(mem, CHUNK, 2, 4, 3)
    assert messages[0]["content"] == system_prompt("flat", "hermes")
    assert "1 older items hidden" in messages[1]["content"]


def test_token_counter(tok):
    count = make_token_counter(tok)
    assert count("") == 0
    assert count(CHUNK) == len(encode(tok, CHUNK)) > 0


# ---- build ----------------------------------------------------------------------------------
def test_ids_are_the_encoding_of_the_chat_template_text(tok):
    builder = PromptBuilder(tok, MemoryConfig(window=20, prompt_budget=100000))
    mem = flat_memory(3)
    built = builder.build(mem, CHUNK, step=2, num_steps=5)
    assert built.ids == encode(tok, built.text) and built.tokens == len(built.ids)
    assert built.text.startswith("<|im_start|>system\n" + builder.system + "<|im_end|>\n<|im_start|>user\n")
    assert built.text.endswith(f"Chunk 2/5:\n{CHUNK}<|im_end|>\n<|im_start|>assistant\n")
    assert built.window == 3 and not built.over_budget
    assert all(f"[m{i}]" in built.text for i in (1, 2, 3))


def test_window_shrinks_to_the_largest_that_fits_the_budget(tok):
    mem = flat_memory(12)
    cfg = MemoryConfig(window=10, prompt_budget=100000)
    full = PromptBuilder(tok, cfg).build(mem, CHUNK, 6, 8)
    assert full.window == 10
    budget = full.tokens - 40  # forces a smaller window, but not W = 0
    builder = PromptBuilder(tok, MemoryConfig(window=10, prompt_budget=budget))
    built = builder.build(mem, CHUNK, 6, 8)
    assert 0 < built.window < 10 and built.tokens <= budget and not built.over_budget
    assert CHUNK in built.text and built.ids == encode(tok, built.text)
    # maximal: one more item would not fit
    _, bigger = builder.render(mem, CHUNK, 6, 8, built.window + 1)
    assert len(bigger) > budget
    # the shown items are the most recent ones
    assert "[m12]" in built.text and "[m1]" not in built.text


def test_chunk_is_never_truncated_even_over_budget(tok):
    long_chunk = " ".join([CHUNK] * 30)
    builder = PromptBuilder(tok, MemoryConfig(window=5, prompt_budget=120))
    built = builder.build(flat_memory(4), long_chunk, 3, 4)
    assert built.over_budget and built.truncated_chunk and built.window == 0
    assert built.tokens > 120 and long_chunk in built.text
    assert built.ids == encode(tok, built.text)


def test_build_does_not_change_the_memory(tok):
    mem = flat_memory(5)
    before = mem.to_json()
    PromptBuilder(tok, MemoryConfig(window=3, prompt_budget=50)).build(mem, CHUNK, 1, 2)
    assert mem.to_json() == before


def test_memalpha_memory_and_format(tok):
    mem = MemAlphaMemory()
    for i in range(6):
        mem.apply(ToolCall("new_memory_insert", {"memory_type": "semantic", "content": f"Lena lives in Porto {i}."}), 1)
    mem.apply(ToolCall("memory_update", {"memory_type": "core", "new_content": "User is Mira."}), 1)
    cfg = MemoryConfig(kind="memalpha", window=4, prompt_budget=100000)
    builder = PromptBuilder(tok, cfg, tool_format="memalpha")
    built = builder.build(mem, CHUNK, 1, 3)
    assert "✿ARGS✿" in built.text and "new_memory_insert" in built.text
    assert "Core:\nUser is Mira." in built.text and "[s6]" in built.text and "[s2]" not in built.text
    assert built.ids == encode(tok, built.text)


def test_enable_thinking_reaches_the_chat_template(tok):
    qwen_like = copy.deepcopy(tok)
    qwen_like.chat_template = tok.chat_template + (
        "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        "<think>\n\n</think>\n\n{% endif %}"
    )
    mem = FlatMemory()
    off = PromptBuilder(qwen_like, MemoryConfig(), enable_thinking=False).build(mem, CHUNK, 1, 1)
    on = PromptBuilder(qwen_like, MemoryConfig(), enable_thinking=True).build(mem, CHUNK, 1, 1)
    assert off.text.endswith("<think>\n\n</think>\n\n") and not on.text.endswith("</think>\n\n")


def test_tokenizer_without_chat_template_is_refused(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        PromptBuilder(bare, MemoryConfig())
