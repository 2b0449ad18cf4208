"""The memory environments the policy writes to: Fine-Mem's flat list and Mem-alpha's three stores.

Both take parsed `ToolCall`s, apply them in order and answer every call with an `OpResult`; a bad
call is refused with a reason and never raises (malformed model output is an invalid operation,
never a crash). Both expose the same snapshot as a list of `MemoryItem {id, content, step}` so the
retrieval, the chunk-level reward and evidence attribution treat them alike.

Rules shared by both memories (documented choices are marked "ours"):
- `step` of an item is the last step that wrote it: INSERT sets it, UPDATE re-stamps it.
- Contents are stored stripped; an empty or non-string content is refused.
- Exact-duplicate INSERT (stripped content equal to a live item of the same store) is refused.
- UPDATE to the item's current content is refused (ours): it would change nothing but re-stamp
  the item, which would let a policy steal evidence credit (EARA) for an older step's write.
  UPDATE to the content of *another* live item is refused as a duplicate.
- Ids are never reused within an episode; a `memory_id` may be given as "m3", "[m3]", "3" or 3.
- Extra, unknown arguments are ignored (ours): the call's meaning is still clear.
- Recency (what `render(window)` shows) is ordered by (step, insertion position): the W items
  with the latest write steps, shown oldest -> newest. It depends only on the snapshot, so a
  restored memory renders exactly like the original.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from finemem.records import MemoryItem, OpResult, ToolCall

FLAT_TOOLS = ("memory_insert", "memory_update", "memory_delete")
MEMALPHA_TOOLS = ("new_memory_insert", "memory_update", "memory_delete")
MEMALPHA_STORES = ("core", "semantic", "episodic")
_STORE_PREFIX = {"semantic": "s", "episodic": "e"}


# The reason of the invalid op a rollout adds for a response cut by the token limit (`rollout.episode`).
TRUNCATED_REASON = "response hit the token limit"
# The start of the reason of the one invalid op of a step whose prompt does not fit the manager's
# context (`rollout.episode`: no request is sent; the harness counts these steps as not prompted).
PROMPT_TOO_LONG_REASON = "prompt does not fit"

# Refusal reason (its start, as written by the memories here and `rollout.episode`) -> a short kind,
# first match wins. Kinds group what a warm start or a reward has to fix: bad syntax, wrong
# arguments, ids that are not in the memory, duplicates, cut responses.
_REFUSAL_KINDS = (
    ("unparsable call", "unparsable"),
    ("unknown tool", "unknown_tool"),
    ("arguments must be", "unparsable"),
    ("missing argument", "missing_argument"),
    ("argument '", "bad_argument"),
    ("malformed memory_id", "malformed_id"),
    ("unknown memory_id", "unknown_id"),
    ("exact duplicate", "duplicate"),
    ("new_content is identical", "unchanged_update"),
    (TRUNCATED_REASON, "truncated"),
    (PROMPT_TOO_LONG_REASON, "prompt_too_long"),
)


def refusal_kind(reason: str) -> str:
    """The kind of a refused op's `reason` (see `_REFUSAL_KINDS`); "other" for any other reason."""
    for start, kind in _REFUSAL_KINDS:
        if reason.startswith(start):
            return kind
    return "other"


def word_count(text: str) -> int:
    """Default token counter when no tokenizer is at hand: whitespace-separated words."""
    return len(text.split())


def _op_of(name: str) -> str:
    return {
        "memory_insert": "insert",
        "new_memory_insert": "insert",
        "memory_update": "update",
        "memory_delete": "delete",
    }.get(name, "invalid")


def _content_arg(args: dict[str, Any], key: str) -> tuple[str | None, str]:
    """The stripped string in `args[key]`, or None with the reason it is unusable."""
    if key not in args:
        return None, f"missing argument '{key}'"
    value = args[key]
    if not isinstance(value, str):
        return None, f"argument '{key}' must be a string, got {type(value).__name__}"
    value = value.strip()
    if not value:
        return None, f"argument '{key}' is empty"
    return value, ""


_ID_RE = re.compile(r"^\[?\s*([A-Za-z]*)\s*(\d{1,9})\s*\]?$")  # bounded: int() of huge digit runs raises


def _id_arg(args: dict[str, Any], prefix: str) -> tuple[str | None, str]:
    """Normalise `args['memory_id']` to '<prefix><n>' (accepts 'm3', '[m3]', '3', 3)."""
    if "memory_id" not in args:
        return None, "missing argument 'memory_id'"
    raw = args["memory_id"]
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        return None, f"argument 'memory_id' must be a string, got {type(raw).__name__}"
    if isinstance(raw, int) and not 0 <= raw < 10**9:
        return None, f"malformed memory_id {raw if abs(raw) < 10**12 else '<huge int>'} (expected like '{prefix}3')"
    text = str(raw).strip()
    if not text:
        return None, "argument 'memory_id' is empty"
    m = _ID_RE.match(text)
    if not m or (m.group(1) and m.group(1).lower() != prefix):
        return None, f"malformed memory_id {text!r} (expected like '{prefix}3')"
    return f"{prefix}{int(m.group(2))}", ""


def _check_call(call: ToolCall, known: tuple[str, ...]) -> OpResult | None:
    """Refusal for a call that failed to parse or names an unknown tool; None when it may proceed."""
    if call.error:
        return OpResult("invalid", False, f"unparsable call: {call.error}")
    if call.name not in known:
        return OpResult("invalid", False, f"unknown tool {call.name!r} (tools: {', '.join(known)})")
    if not isinstance(call.arguments, dict):
        return OpResult("invalid", False, "arguments must be a JSON object")
    return None


def _recent(items: list[MemoryItem], window: int) -> list[MemoryItem]:
    """The `window` most recently written items, oldest -> newest (ties: insertion order)."""
    if window <= 0:
        return []
    order = sorted(range(len(items)), key=lambda i: (items[i].step, i))
    return [items[i] for i in order[-window:]]


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (steps are t = 1..T), got {step!r}")


class FlatMemory:
    """Fine-Mem's memory: one flat list of `{id, content, step}` items with ids m1, m2, ..."""

    kind = "flat"

    def __init__(self) -> None:
        self._items: dict[str, MemoryItem] = {}  # insertion order
        self._next_id = 1

    # ---- operations -------------------------------------------------------------------------
    def apply_all(self, calls: list[ToolCall], step: int) -> list[OpResult]:
        """Apply the calls of one step in order; no call at all is a SKIP."""
        _check_step(step)
        if not calls:
            return [OpResult("skip", True)]
        return [self.apply(c, step) for c in calls]

    def apply(self, call: ToolCall, step: int) -> OpResult:
        _check_step(step)
        refused = _check_call(call, FLAT_TOOLS)
        if refused:
            return refused
        args = call.arguments
        if call.name == "memory_insert":
            return self._insert(args, step)
        if call.name == "memory_update":
            return self._update(args, step)
        return self._delete(args)

    def _duplicate_of(self, content: str, exclude: str | None = None) -> str | None:
        for item in self._items.values():
            if item.id != exclude and item.content == content:
                return item.id
        return None

    def _insert(self, args: dict[str, Any], step: int) -> OpResult:
        content, why = _content_arg(args, "content")
        if content is None:
            return OpResult("insert", False, why)
        dup = self._duplicate_of(content)
        if dup:
            return OpResult("insert", False, f"exact duplicate of live item {dup}", dup)
        mid = f"m{self._next_id}"
        self._next_id += 1
        self._items[mid] = MemoryItem(mid, content, step)
        return OpResult("insert", True, "", mid)

    def _update(self, args: dict[str, Any], step: int) -> OpResult:
        mid, why = _id_arg(args, "m")
        if mid is None:
            return OpResult("update", False, why)
        if mid not in self._items:
            return OpResult("update", False, f"unknown memory_id {mid}", mid)
        content, why = _content_arg(args, "new_content")
        if content is None:
            return OpResult("update", False, why, mid)
        if self._items[mid].content == content:
            return OpResult("update", False, "new_content is identical to the current content", mid)
        dup = self._duplicate_of(content, exclude=mid)
        if dup:
            return OpResult("update", False, f"exact duplicate of live item {dup}", mid)
        self._items[mid] = MemoryItem(mid, content, step)
        return OpResult("update", True, "", mid)

    def _delete(self, args: dict[str, Any]) -> OpResult:
        mid, why = _id_arg(args, "m")
        if mid is None:
            return OpResult("delete", False, why)
        if mid not in self._items:
            return OpResult("delete", False, f"unknown memory_id {mid}", mid)
        del self._items[mid]
        return OpResult("delete", True, "", mid)

    # ---- state ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    @property
    def next_id(self) -> int:
        """The number of the next id to hand out (ids are never reused)."""
        return self._next_id

    def snapshot(self) -> list[MemoryItem]:
        """A deep copy of the items in insertion order."""
        return [MemoryItem(i.id, i.content, i.step) for i in self._items.values()]

    @classmethod
    def restore(cls, items: list[MemoryItem], next_id: int | None = None) -> FlatMemory:
        """Rebuild from a snapshot; `next_id` defaults to one past the largest id present."""
        mem = cls()
        for n, item in enumerate(items):
            m = re.fullmatch(r"m(\d+)", str(item.id))
            if not m:
                raise ValueError(f"flat memory item {n}: bad id {item.id!r} (expected like 'm3')")
            if item.id in mem._items:
                raise ValueError(f"flat memory item {n}: duplicate id {item.id!r}")
            if not isinstance(item.content, str) or not isinstance(item.step, int):
                raise TypeError(f"flat memory item {n} ({item.id}): content must be str and step int")
            mem._items[item.id] = MemoryItem(item.id, item.content, item.step)
            mem._next_id = max(mem._next_id, int(m.group(1)) + 1)
        if next_id is not None:
            if next_id < mem._next_id:
                raise ValueError(f"next_id {next_id} would reuse an existing id (need >= {mem._next_id})")
            mem._next_id = next_id
        return mem

    def to_json(self) -> str:
        return json.dumps(
            {"kind": self.kind, "next_id": self._next_id, "items": [i.to_dict() for i in self._items.values()]},
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, s: str) -> FlatMemory:
        try:
            d = json.loads(s)
            if d.get("kind") != cls.kind:
                raise ValueError(f"kind is {d.get('kind')!r}, expected {cls.kind!r}")
            items = [MemoryItem.from_dict(x) for x in d["items"]]
            next_id = int(d["next_id"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read flat memory JSON: {e}") from e
        return cls.restore(items, next_id=next_id)

    # ---- prompt view ------------------------------------------------------------------------
    def render(self, window: int) -> str:
        """`[id] content` lines of the `window` most recently written items (oldest first)."""
        return "\n".join(f"[{i.id}] {i.content}" for i in _recent(list(self._items.values()), window))

    def visible_count(self, window: int) -> int:
        """How many items `render(window)` shows."""
        return len(_recent(list(self._items.values()), window))

    def token_length(self, count_tokens: Callable[[str], int]) -> int:
        """Tokens of the whole memory rendered (the compression reward's memory size)."""
        return count_tokens(self.render(len(self._items)))


class MemAlphaMemory:
    """Mem-alpha's memory: a core paragraph plus semantic (s1, ...) and episodic (e1, ...) stores.

    The core is written only by `memory_update(memory_type="core", new_content)` (replace) and
    cleared by `memory_delete(memory_type="core")`; inserting into core is refused, and so is a
    core longer than `core_max_tokens` (measured with `count_tokens`). In the snapshot the core is
    the item with id "core" stamped with the step that last wrote it. Duplicates are checked within
    a store (ours).
    """

    kind = "memalpha"

    def __init__(self, core_max_tokens: int = 512, count_tokens: Callable[[str], int] | None = None) -> None:
        self.core_max_tokens = core_max_tokens
        self.count_tokens = count_tokens or word_count
        self._core = ""
        self._core_step = 0
        self._stores: dict[str, dict[str, MemoryItem]] = {"semantic": {}, "episodic": {}}
        self._next_id = {"semantic": 1, "episodic": 1}

    # ---- operations -------------------------------------------------------------------------
    apply_all = FlatMemory.apply_all  # same rule: calls in order, no call at all is a SKIP

    def apply(self, call: ToolCall, step: int) -> OpResult:
        _check_step(step)
        refused = _check_call(call, MEMALPHA_TOOLS)
        if refused:
            return refused
        op = _op_of(call.name)
        store, why = self._store_arg(call.arguments)
        if store is None:
            return OpResult(op, False, why)
        if op == "insert":
            return self._insert(store, call.arguments, step)
        if op == "update":
            return self._update(store, call.arguments, step)
        return self._delete(store, call.arguments)

    @staticmethod
    def _store_arg(args: dict[str, Any]) -> tuple[str | None, str]:
        if "memory_type" not in args:
            return None, "missing argument 'memory_type'"
        value = args["memory_type"]
        if not isinstance(value, str):
            return None, f"argument 'memory_type' must be a string, got {type(value).__name__}"
        store = value.strip().lower()
        if store not in MEMALPHA_STORES:
            return None, f"unknown memory_type {value!r} (one of: {', '.join(MEMALPHA_STORES)})"
        return store, ""

    def _insert(self, store: str, args: dict[str, Any], step: int) -> OpResult:
        if store == "core":
            return OpResult("insert", False, "cannot insert into core memory; use memory_update")
        content, why = _content_arg(args, "content")
        if content is None:
            return OpResult("insert", False, why)
        items = self._stores[store]
        for item in items.values():
            if item.content == content:
                return OpResult("insert", False, f"exact duplicate of live item {item.id}", item.id)
        mid = f"{_STORE_PREFIX[store]}{self._next_id[store]}"
        self._next_id[store] += 1
        items[mid] = MemoryItem(mid, content, step)
        return OpResult("insert", True, "", mid)

    def _update(self, store: str, args: dict[str, Any], step: int) -> OpResult:
        content, why = _content_arg(args, "new_content")
        if store == "core":
            if content is None:
                return OpResult("update", False, why, "core")
            if content == self._core:
                return OpResult("update", False, "new_content is identical to the current content", "core")
            n = self.count_tokens(content)
            if n > self.core_max_tokens:
                return OpResult("update", False, f"core has {n} tokens > limit {self.core_max_tokens}", "core")
            self._core, self._core_step = content, step
            return OpResult("update", True, "", "core")
        mid, why_id = _id_arg(args, _STORE_PREFIX[store])
        if mid is None:
            return OpResult("update", False, why_id)
        items = self._stores[store]
        if mid not in items:
            return OpResult("update", False, f"unknown memory_id {mid} in {store} memory", mid)
        if content is None:
            return OpResult("update", False, why, mid)
        if items[mid].content == content:
            return OpResult("update", False, "new_content is identical to the current content", mid)
        for item in items.values():
            if item.id != mid and item.content == content:
                return OpResult("update", False, f"exact duplicate of live item {item.id}", mid)
        items[mid] = MemoryItem(mid, content, step)
        return OpResult("update", True, "", mid)

    def _delete(self, store: str, args: dict[str, Any]) -> OpResult:
        if store == "core":
            if not self._core:
                return OpResult("delete", False, "core memory is already empty", "core")
            self._core, self._core_step = "", 0
            return OpResult("delete", True, "", "core")
        mid, why = _id_arg(args, _STORE_PREFIX[store])
        if mid is None:
            return OpResult("delete", False, why)
        if mid not in self._stores[store]:
            return OpResult("delete", False, f"unknown memory_id {mid} in {store} memory", mid)
        del self._stores[store][mid]
        return OpResult("delete", True, "", mid)

    # ---- state ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return (1 if self._core else 0) + sum(len(s) for s in self._stores.values())

    @property
    def core(self) -> str:
        return self._core

    def store_items(self, store: str) -> list[MemoryItem]:
        """A copy of one store's items ("semantic" or "episodic") in insertion order."""
        return [MemoryItem(i.id, i.content, i.step) for i in self._stores[store].values()]

    def snapshot(self) -> list[MemoryItem]:
        """Core (id "core", if non-empty), then semantic, then episodic items; deep copies."""
        out = [MemoryItem("core", self._core, self._core_step)] if self._core else []
        return out + self.store_items("semantic") + self.store_items("episodic")

    @classmethod
    def restore(
        cls,
        items: list[MemoryItem],
        next_ids: dict[str, int] | None = None,
        core_max_tokens: int = 512,
        count_tokens: Callable[[str], int] | None = None,
    ) -> MemAlphaMemory:
        """Rebuild from a snapshot; counters default to one past the largest id of each store."""
        mem = cls(core_max_tokens=core_max_tokens, count_tokens=count_tokens)
        seen: set[str] = set()
        for n, item in enumerate(items):
            if item.id in seen:
                raise ValueError(f"memalpha memory item {n}: duplicate id {item.id!r}")
            seen.add(item.id)
            if not isinstance(item.content, str) or not isinstance(item.step, int):
                raise TypeError(f"memalpha memory item {n} ({item.id}): content must be str and step int")
            if item.id == "core":
                mem._core, mem._core_step = item.content, item.step
                continue
            m = re.fullmatch(r"([se])(\d+)", str(item.id))
            if not m:
                raise ValueError(f"memalpha memory item {n}: bad id {item.id!r} (expected 'core', 's3' or 'e3')")
            store = "semantic" if m.group(1) == "s" else "episodic"
            mem._stores[store][item.id] = MemoryItem(item.id, item.content, item.step)
            mem._next_id[store] = max(mem._next_id[store], int(m.group(2)) + 1)
        for store, value in (next_ids or {}).items():
            if store not in mem._next_id:
                raise ValueError(f"next_ids: unknown store {store!r}")
            if value < mem._next_id[store]:
                raise ValueError(f"next_ids[{store!r}] = {value} would reuse an existing id")
            mem._next_id[store] = value
        return mem

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "core_max_tokens": self.core_max_tokens,
                "next_ids": dict(self._next_id),
                "items": [i.to_dict() for i in self.snapshot()],
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, s: str, count_tokens: Callable[[str], int] | None = None) -> MemAlphaMemory:
        try:
            d = json.loads(s)
            if d.get("kind") != cls.kind:
                raise ValueError(f"kind is {d.get('kind')!r}, expected {cls.kind!r}")
            items = [MemoryItem.from_dict(x) for x in d["items"]]
            next_ids = {str(k): int(v) for k, v in d["next_ids"].items()}
            core_max = int(d.get("core_max_tokens", 512))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read memalpha memory JSON: {e}") from e
        return cls.restore(items, next_ids=next_ids, core_max_tokens=core_max, count_tokens=count_tokens)

    # ---- prompt view ------------------------------------------------------------------------
    def render(self, window: int) -> str:
        """Core, then the `window` most recent items of each store, each under a label."""
        lines = ["Core:", self._core if self._core else "(empty)"]
        for store in ("semantic", "episodic"):
            shown = _recent(list(self._stores[store].values()), window)
            lines.append(f"{store.capitalize()}:")
            lines.extend(f"[{i.id}] {i.content}" for i in shown)
            if not shown:
                lines.append("(empty)" if not self._stores[store] else "(hidden)")
        return "\n".join(lines)

    def visible_count(self, window: int) -> int:
        """How many items (core counted as one) `render(window)` shows."""
        return (1 if self._core else 0) + sum(
            len(_recent(list(s.values()), window)) for s in self._stores.values()
        )

    def token_length(self, count_tokens: Callable[[str], int]) -> int:
        return count_tokens(self.render(max([len(s) for s in self._stores.values()] + [0])))


def make_memory(kind: str, **kw: Any) -> FlatMemory | MemAlphaMemory:
    """A fresh, empty memory of `kind` ("flat" | "memalpha").

    Options: `core_max_tokens`, `count_tokens` (Mem-alpha core limit). The flat memory has no
    options and ignores these two, so callers can pass the same kwargs for either kind.
    """
    unknown = set(kw) - {"core_max_tokens", "count_tokens"}
    if unknown:
        raise ValueError(f"make_memory: unknown options {sorted(unknown)} (core_max_tokens, count_tokens)")
    if kind == "flat":
        return FlatMemory()
    if kind == "memalpha":
        return MemAlphaMemory(**kw)
    raise ValueError(f"unknown memory kind {kind!r} (flat | memalpha)")
