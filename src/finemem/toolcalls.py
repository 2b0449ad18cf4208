"""Tool schemas, one tolerant parser for both surface formats, and the exact text a model should emit.

Surface formats (both may occur in one text; calls are returned in the order they appear):
- Hermes / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; `arguments`
  may also be a JSON-encoded string, and one block may hold a JSON list of calls.
- Mem-alpha (Qwen-Agent style): `✿FUNCTION✿: name` then `✿ARGS✿: {json}`; the arguments run to
  the next marker (`✿FUNCTION✿`, `✿ARGS✿`, `✿RESULT✿`, `✿RETURN✿`, `<tool_call>`) or the end.

`parse_tool_calls` never raises: a call it cannot understand (bad JSON, unterminated block because
generation hit the length limit, missing name, non-object arguments) comes back as a `ToolCall`
with `error` set, which the memory counts as an invalid operation. Text with no marker is a SKIP
(`[]`). A leading `<think>...</think>` block is dropped; an unterminated leading `<think>` (the
model thought until the length limit) is one error call (ours), not a free SKIP.
"""

from __future__ import annotations

import json
import re
from typing import Any

from finemem.records import ToolCall

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
FN, ARGS = "✿FUNCTION✿", "✿ARGS✿"
_STARTS = re.compile(re.escape(HERMES_OPEN) + "|" + FN + "|" + ARGS)
_ARGS_END = re.compile(re.escape(HERMES_OPEN) + "|" + FN + "|" + ARGS + "|✿RESULT✿|✿RETURN✿")
_NAME_HINT = re.compile(r'"name"\s*:\s*"([^"\\]{1,100})"')
_TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")

# Marker text inside JSON strings is written as \\uXXXX escapes so rendered calls always round-trip.
_ESCAPES = (
    ("<tool_call>", "\\u003ctool_call>"),
    ("</tool_call>", "\\u003c/tool_call>"),
    ("<think>", "\\u003cthink>"),
    ("</think>", "\\u003c/think>"),
    ("✿", "\\u273f"),
)


# ---- schemas --------------------------------------------------------------------------------
def _fn(name: str, description: str, props: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": props, "required": required},
        },
    }


def tool_schemas(kind: str = "flat") -> list[dict[str, Any]]:
    """OpenAI function schemas of the memory tools of `kind` ("flat" | "memalpha")."""
    if kind == "flat":
        mid = {"type": "string", "description": "id of an existing item, e.g. m3"}
        return [
            _fn("memory_insert", "Add a new memory item.",
                {"content": {"type": "string", "description": "one self-contained fact"}}, ["content"]),
            _fn("memory_update", "Replace the content of an existing item.",
                {"memory_id": mid, "new_content": {"type": "string"}}, ["memory_id", "new_content"]),
            _fn("memory_delete", "Remove an item.", {"memory_id": mid}, ["memory_id"]),
        ]
    if kind == "memalpha":
        stores = {"type": "string", "enum": ["semantic", "episodic"]}
        any_store = {"type": "string", "enum": ["core", "semantic", "episodic"]}
        mid = {"type": "string", "description": "id of an existing item, e.g. s3 or e2 (not for core)"}
        return [
            _fn("new_memory_insert", "Add an item to the semantic or episodic memory.",
                {"memory_type": stores, "content": {"type": "string"}}, ["memory_type", "content"]),
            _fn("memory_update", "Replace an item's content, or the whole core memory paragraph.",
                {"memory_type": any_store, "new_content": {"type": "string"}, "memory_id": mid},
                ["memory_type", "new_content"]),
            _fn("memory_delete", "Remove an item, or clear the core memory.",
                {"memory_type": any_store, "memory_id": mid}, ["memory_type"]),
        ]
    raise ValueError(f"unknown tool kind {kind!r} (flat | memalpha)")


# ---- parsing --------------------------------------------------------------------------------
def _error(raw: str, why: str, name: str = "") -> ToolCall:
    if not name:
        hint = _NAME_HINT.search(raw)
        name = hint.group(1) if hint else ""
    return ToolCall(name=name, arguments={}, raw=raw, error=why)


def _loads(text: str) -> tuple[Any, str]:
    """json.loads that reports instead of raising (also catches RecursionError on deep nesting)."""
    try:
        return json.loads(text), ""
    except Exception as e:  # noqa: BLE001 - any failure is a malformed call
        return None, f"bad JSON: {type(e).__name__}: {str(e)[:120]}"


def _arguments(value: Any) -> tuple[dict[str, Any] | None, str]:
    """The arguments as a dict; a JSON-encoded string is decoded; absent/null/"" is {}."""
    if value is None:
        return {}, ""
    if isinstance(value, str):
        if not value.strip():
            return {}, ""
        value, why = _loads(value)
        if why:
            return None, f"arguments string is not JSON ({why})"
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, ""


def _call_from_object(obj: Any, raw: str) -> ToolCall:
    if not isinstance(obj, dict):
        return _error(raw, f"a tool call must be a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("function"), dict) and "name" not in obj:  # OpenAI-style nesting
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return _error(raw, "missing tool name")
    args, why = _arguments(obj.get("arguments", obj.get("parameters")))
    if args is None:
        return _error(raw, why, name.strip())
    return ToolCall(name=name.strip(), arguments=args, raw=raw)


def _parse_hermes_body(body: str, raw: str) -> list[ToolCall]:
    if not body.strip():
        return [_error(raw, "empty <tool_call> block")]
    value, why = _loads(body.strip())
    if why:
        return [_error(raw, why)]
    if isinstance(value, list):
        if not value:
            return [_error(raw, "empty list of tool calls")]
        return [_call_from_object(v, raw) for v in value]
    return [_call_from_object(value, raw)]


def _strip_think(text: str) -> tuple[str, ToolCall | None]:
    stripped = text.lstrip()
    if stripped.startswith("<think>"):
        end = stripped.find("</think>")
        if end < 0:
            return "", _error(text[:200], "unterminated <think> block (no </think>)")
        return stripped[end + len("</think>"):], None
    end = text.find("</think>")
    if end >= 0 and not _STARTS.search(text, 0, end):  # the template opened <think> in the prompt
        return text[end + len("</think>"):], None
    return text, None


def _scan(text: str) -> list[ToolCall]:
    calls: list[ToolCall] = []
    pos = 0
    while True:
        m = _STARTS.search(text, pos)
        if m is None:
            return calls
        if m.group() == HERMES_OPEN:
            start = m.end()
            close = text.find(HERMES_CLOSE, start)
            reopen = text.find(HERMES_OPEN, start)
            if close >= 0 and (reopen < 0 or close < reopen):
                raw = text[m.start(): close + len(HERMES_CLOSE)]
                calls.extend(_parse_hermes_body(text[start:close], raw))
                pos = close + len(HERMES_CLOSE)
            else:
                end = reopen if reopen >= 0 else len(text)
                calls.append(_error(text[m.start(): end], "unterminated <tool_call> block (no </tool_call>)"))
                pos = end
        elif m.group() == ARGS:
            end_m = _ARGS_END.search(text, m.end())
            end = end_m.start() if end_m else len(text)
            calls.append(_error(text[m.start(): end], f"{ARGS} without a preceding {FN}"))
            pos = end
        else:
            call, pos = _parse_memalpha(text, m)
            calls.append(call)


def _parse_memalpha(text: str, m: re.Match[str]) -> tuple[ToolCall, int]:
    """One `✿FUNCTION✿: name` + `✿ARGS✿: {json}` call starting at match `m`, and where it ends."""
    line_end = text.find("\n", m.end())
    line_end = len(text) if line_end < 0 else line_end
    nxt = _ARGS_END.search(text, m.end())
    name_end = min(line_end, nxt.start()) if nxt else line_end
    name = text[m.end(): name_end].strip().lstrip(":").strip()
    if nxt is None or nxt.group() != ARGS or text[name_end: nxt.start()].strip():
        return _error(text[m.start(): name_end], f"{FN} without {ARGS}", name), name_end
    body_start = nxt.end()
    end_m = _ARGS_END.search(text, body_start)
    end = end_m.start() if end_m else len(text)
    raw = text[m.start(): end].rstrip()
    body = text[body_start:end].strip()
    if body.startswith(":"):
        body = body[1:].strip()
    if not name:
        return _error(raw, "missing tool name"), end
    if not body:
        return _error(raw, f"empty {ARGS}", name), end
    value, why = _loads(body)
    if why:
        return _error(raw, why, name), end
    args, why = _arguments(value)
    if args is None:
        return _error(raw, why, name), end
    return ToolCall(name=name, arguments=args, raw=raw), end


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every tool call in `text`, in order; never raises (see the module docstring)."""
    try:
        if not isinstance(text, str):
            return [_error("", f"model output is not a string but {type(text).__name__}")]
        body, think_error = _strip_think(text)
        if think_error:
            return [think_error]
        return _scan(body)
    except Exception as e:  # noqa: BLE001 - last line of defence: malformed output is never a crash
        return [_error(str(text)[:200], f"parser failure: {type(e).__name__}: {e}")]


# ---- rendering ------------------------------------------------------------------------------
def _dumps(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    for marker, escaped in _ESCAPES:
        text = text.replace(marker, escaped)
    return text


def render_tool_calls(calls: list[tuple[str, dict[str, Any]]] | list[ToolCall], fmt: str = "hermes") -> str:
    """The exact text a model should emit for `calls`; `parse_tool_calls` reads it back unchanged.

    One block per call, blocks separated by a newline; no calls -> "" (a SKIP).
    """
    if fmt not in ("hermes", "memalpha"):
        raise ValueError(f"unknown tool-call format {fmt!r} (hermes | memalpha)")
    blocks = []
    for call in calls:
        name, args = (call.name, call.arguments) if isinstance(call, ToolCall) else call
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"cannot render tool name {name!r}")
        if not isinstance(args, dict):
            raise TypeError(f"arguments of {name} must be a dict, got {type(args).__name__}")
        if fmt == "hermes":
            blocks.append(f"{HERMES_OPEN}\n{_dumps({'name': name, 'arguments': args})}\n{HERMES_CLOSE}")
        else:
            blocks.append(f"{FN}: {name}\n{ARGS}: {_dumps(args)}")
    return "\n".join(blocks)
