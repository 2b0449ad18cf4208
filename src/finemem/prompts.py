"""The step prompt: system prompt with the tool schemas, the memory window, the chunk -> token ids.

Every step is a fresh two-message chat (no history): the system prompt, then a user message with
the memory (the W most recently written items) and the new chunk. W starts at
`memory_cfg.window` and shrinks until the prompt fits `memory_cfg.prompt_budget` tokens; the
chunk is never cut. If even W = 0 does not fit, the prompt is returned with `over_budget=True`
and the caller decides what to do.

The tiny CPU policy pays for every prompt token, so the default `style="compact"` system prompt
is a few lines with minimal schemas; `style="full"` renders the complete OpenAI schemas.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finemem.toolcalls import tool_schemas

_TASK = {
    "compact": (
        "You manage a memory. You see the memory and a new chunk of text. "
        "Store facts likely to be asked about later, update items whose facts changed, "
        "delete wrong items; keep the memory short. Reply only with tool calls; reply with nothing to skip."
    ),
    "full": (
        "You are a memory manager. At each step you see the current memory and a new chunk of text; "
        "you cannot see earlier chunks again, so the memory is all that will remain of them. "
        "Questions about the text will later be answered only from the memory.\n"
        "- Insert short, self-contained facts that are likely to be asked about later.\n"
        "- Update an item when the chunk changes or corrects its fact; delete items that are wrong or useless.\n"
        "- Do not store duplicates or filler; keep the memory compact.\n"
        "Reply only with tool calls, as many as needed. If the chunk holds nothing worth keeping, reply with nothing."
    ),
}

_CALL_FORMAT = {
    "hermes": 'Call format:\n<tool_call>\n{"name": "<tool>", "arguments": {<args>}}\n</tool_call>',
    "memalpha": "Call format:\n✿FUNCTION✿: <tool>\n✿ARGS✿: {<args>}",
}

_MEMALPHA_NOTE = (
    "Memory has a core paragraph (write it with memory_update, memory_type core) and semantic "
    "(facts) and episodic (events) stores."
)


def _compact_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """{"name": ..., "arguments": {param: type or enum}}: the least a model needs to call a tool."""
    fn = schema["function"]
    params = fn["parameters"]
    required = set(params.get("required", []))
    args = {}
    for name, spec in params["properties"].items():
        kind = "|".join(spec["enum"]) if "enum" in spec else spec.get("type", "string")
        args[name] = kind if name in required else kind + "?"
    return {"name": fn["name"], "arguments": args}


def system_prompt(memory_kind: str = "flat", tool_format: str = "hermes", style: str = "compact") -> str:
    """The task, the call format and the tool schemas (compact JSON, one per line)."""
    if style not in _TASK:
        raise ValueError(f"unknown prompt style {style!r} (compact | full)")
    if tool_format not in _CALL_FORMAT:
        raise ValueError(f"unknown tool format {tool_format!r} (hermes | memalpha)")
    schemas = tool_schemas(memory_kind)
    if style == "compact":
        schemas = [_compact_schema(s) for s in schemas]
    lines = [_TASK[style]]
    if memory_kind == "memalpha":
        lines.append(_MEMALPHA_NOTE)
    lines.append(_CALL_FORMAT[tool_format])
    lines.append("Tools:")
    lines.extend(json.dumps(s, ensure_ascii=False, separators=(",", ":")) for s in schemas)
    return "\n".join(lines)


def make_token_counter(tokenizer: Any) -> Callable[[str], int]:
    """count_tokens(text): tokens of `text` alone, without special tokens."""

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0

    return count_tokens


def user_message(memory: Any, chunk: str, step: int, num_steps: int, window: int) -> str:
    """The memory view (W most recent items; a note when older ones are hidden) and the chunk."""
    total = len(memory)
    hidden = total - memory.visible_count(window)
    if total == 0:
        lines = ["Memory: (empty)"]
    else:
        lines = [f"Memory ({hidden} older items hidden):" if hidden else "Memory:"]
        view = memory.render(window)
        if view:
            lines.append(view)
    lines += [f"Chunk {step}/{num_steps}:", chunk]
    return "\n".join(lines)


def build_messages(
    memory: Any,
    chunk: str,
    step: int,
    num_steps: int,
    memory_cfg: Any,
    tool_format: str = "hermes",
    window: int | None = None,
    memory_kind: str | None = None,
    style: str = "compact",
) -> list[dict[str, str]]:
    """[system, user] for one step at a fixed window (default `memory_cfg.window`, no budget).

    For callers without a tokenizer (e.g. building the tokenizer's own training corpus);
    `PromptBuilder.build` adds the budget-driven window on top of the same messages.
    """
    kind = memory_kind or str(memory_cfg.kind)
    w = int(memory_cfg.window) if window is None else window
    return [
        {"role": "system", "content": system_prompt(kind, tool_format, style)},
        {"role": "user", "content": user_message(memory, chunk, step, num_steps, w)},
    ]


@dataclass
class BuiltPrompt:
    """A rendered step prompt: `ids` are exactly the tokenizer's encoding of `text`.

    `window` is the W that was used; `over_budget` is True when even W = 0 exceeds the budget
    (the chunk alone is too long; it is never cut).
    """

    ids: list[int]
    text: str
    window: int
    tokens: int
    over_budget: bool = False

    @property
    def truncated_chunk(self) -> bool:
        """Alias of `over_budget`: the chunk would need cutting to fit (it is not cut)."""
        return self.over_budget


class PromptBuilder:
    """Builds the step prompt for one policy (tokenizer + chat template) and memory configuration."""

    def __init__(
        self,
        tokenizer: Any,
        memory_cfg: Any,
        tool_format: str = "hermes",
        enable_thinking: bool = False,
        memory_kind: str | None = None,
        style: str = "compact",
    ) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("PromptBuilder: the tokenizer has no chat_template (needed to build prompts)")
        self.tokenizer = tokenizer
        self.window = int(memory_cfg.window)
        self.prompt_budget = int(memory_cfg.prompt_budget)
        self.memory_kind = memory_kind or str(memory_cfg.kind)
        self.tool_format = tool_format
        self.enable_thinking = enable_thinking
        self.style = style
        self.system = system_prompt(self.memory_kind, tool_format, style)
        self.count_tokens = make_token_counter(tokenizer)

    def build_messages(self, memory: Any, chunk: str, step: int, num_steps: int, window: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": user_message(memory, chunk, step, num_steps, window)},
        ]

    def render(self, memory: Any, chunk: str, step: int, num_steps: int, window: int) -> tuple[str, list[int]]:
        """Chat-template text (generation prompt appended) and its token ids for one window."""
        text = self.tokenizer.apply_chat_template(
            self.build_messages(memory, chunk, step, num_steps, window),
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=self.enable_thinking,  # Qwen3 templates read it; others ignore it
        )
        return text, list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def build(self, memory: Any, chunk: str, step: int, num_steps: int) -> BuiltPrompt:
        """The prompt with the largest window W <= memory_cfg.window that fits the budget.

        Prompt length grows with W, so the largest fitting W is found by bisection over
        [0, min(window, items)] (a few tokenizations, not one per W).
        """
        hi = max(0, min(self.window, len(memory)))
        text, ids = self.render(memory, chunk, step, num_steps, hi)
        if len(ids) <= self.prompt_budget:
            return BuiltPrompt(ids, text, hi, len(ids))
        best: tuple[int, str, list[int]] | None = None
        lo, hi = 0, hi - 1  # largest fitting W lies in [lo, hi]
        while lo <= hi:
            mid = (lo + hi) // 2
            t, i = self.render(memory, chunk, step, num_steps, mid)
            if len(i) <= self.prompt_budget:
                best, lo = (mid, t, i), mid + 1
            else:
                hi = mid - 1
        if best is None:
            text, ids = self.render(memory, chunk, step, num_steps, 0)
            return BuiltPrompt(ids, text, 0, len(ids), over_budget=True)
        w, text, ids = best
        return BuiltPrompt(ids, text, w, len(ids))
