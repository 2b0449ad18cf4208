"""The memory environments: every refusal reason, id/step rules, rendering and round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finemem.memory import (
    PROMPT_TOO_LONG_REASON,
    TRUNCATED_REASON,
    FlatMemory,
    MemAlphaMemory,
    make_memory,
    refusal_kind,
    word_count,
)
from finemem.records import MemoryItem, ToolCall


def call(name: str, **args) -> ToolCall:
    return ToolCall(name=name, arguments=args)


def ins(content):
    return call("memory_insert", content=content)


def upd(mid, content):
    return call("memory_update", memory_id=mid, new_content=content)


def dele(mid):
    return call("memory_delete", memory_id=mid)


# ---- FlatMemory -----------------------------------------------------------------------------
def test_empty_call_list_is_one_valid_skip():
    mem = FlatMemory()
    [res] = mem.apply_all([], step=1)
    assert (res.op, res.valid) == ("skip", True)
    assert mem.snapshot() == []


def test_insert_assigns_sequential_ids_and_stamps_step():
    mem = FlatMemory()
    r1, r2 = mem.apply_all([ins("Mira's code is 4821."), ins("  Omar likes green.  ")], step=2)
    assert (r1.op, r1.valid, r1.memory_id) == ("insert", True, "m1")
    assert (r2.op, r2.valid, r2.memory_id) == ("insert", True, "m2")
    assert mem.snapshot() == [MemoryItem("m1", "Mira's code is 4821.", 2), MemoryItem("m2", "Omar likes green.", 2)]


def test_ids_are_never_reused_after_delete():
    mem = FlatMemory()
    mem.apply_all([ins("a"), ins("b")], step=1)
    assert mem.apply(dele("m2"), step=2).valid
    res = mem.apply(ins("c"), step=3)
    assert res.memory_id == "m3"
    assert [i.id for i in mem.snapshot()] == ["m1", "m3"]


def test_update_restamps_and_delete_removes():
    mem = FlatMemory()
    mem.apply_all([ins("code 4821"), ins("other")], step=1)
    res = mem.apply(upd("m1", "code 5930"), step=4)
    assert (res.op, res.valid, res.memory_id) == ("update", True, "m1")
    assert mem.snapshot()[0] == MemoryItem("m1", "code 5930", 4)
    assert mem.snapshot()[1].step == 1
    assert mem.apply(dele("m1"), step=5).valid
    assert [i.id for i in mem.snapshot()] == ["m2"]


@pytest.mark.parametrize("given_id", ["m1", "[m1]", " m1 ", "M1", "1", 1, "[ m1 ]"])
def test_memory_id_forms_are_accepted(given_id):
    mem = FlatMemory()
    mem.apply(ins("x"), step=1)
    res = mem.apply(upd(given_id, "y"), step=2)
    assert res.valid and res.memory_id == "m1"


def test_calls_apply_in_order_within_a_step():
    mem = FlatMemory()
    results = mem.apply_all([ins("a"), upd("m1", "b"), dele("m1"), upd("m1", "c")], step=1)
    assert [(r.op, r.valid) for r in results] == [
        ("insert", True), ("update", True), ("delete", True), ("update", False)]
    assert "unknown memory_id m1" in results[3].reason


@pytest.mark.parametrize(
    "bad_call, op, reason",
    [
        (call("memory_write", content="x"), "invalid", "unknown tool 'memory_write'"),
        (ToolCall("memory_insert", {}, error="bad JSON: ..."), "invalid", "unparsable call: bad JSON"),
        (call("memory_insert"), "insert", "missing argument 'content'"),
        (call("memory_insert", content="   "), "insert", "argument 'content' is empty"),
        (call("memory_insert", content=42), "insert", "'content' must be a string, got int"),
        (call("memory_insert", content=["a"]), "insert", "'content' must be a string, got list"),
        (ins("existing fact"), "insert", "exact duplicate of live item m1"),
        (ins("  existing fact\n"), "insert", "exact duplicate of live item m1"),
        (call("memory_update", new_content="x"), "update", "missing argument 'memory_id'"),
        (call("memory_update", memory_id="m1"), "update", "missing argument 'new_content'"),
        (upd("m9", "x"), "update", "unknown memory_id m9"),
        (upd("x1", "x"), "update", "malformed memory_id 'x1'"),
        (upd(True, "x"), "update", "'memory_id' must be a string, got bool"),
        (upd("m" + "9" * 5000, "x"), "update", "malformed memory_id"),
        (upd(10**5000, "x"), "update", "malformed memory_id <huge int>"),
        (upd(-1, "x"), "update", "malformed memory_id -1"),
        (upd("", "x"), "update", "'memory_id' is empty"),
        (upd("m1", ""), "update", "'new_content' is empty"),
        (upd("m1", 3.5), "update", "'new_content' must be a string, got float"),
        (upd("m1", " existing fact "), "update", "identical to the current content"),
        (upd("m1", "second fact"), "update", "exact duplicate of live item m2"),
        (call("memory_delete"), "delete", "missing argument 'memory_id'"),
        (dele("m7"), "delete", "unknown memory_id m7"),
        (dele(None), "delete", "'memory_id' must be a string, got NoneType"),
    ],
)
def test_every_refusal_has_its_reason_and_changes_nothing(bad_call, op, reason):
    mem = FlatMemory()
    mem.apply_all([ins("existing fact"), ins("second fact")], step=1)
    before = mem.to_json()
    res = mem.apply(bad_call, step=2)
    assert (res.op, res.valid) == (op, False)
    assert reason in res.reason
    assert mem.to_json() == before


def test_extra_arguments_are_ignored():
    mem = FlatMemory()
    assert mem.apply(call("memory_insert", content="x", memory_type="semantic"), step=1).valid


def test_step_must_be_a_positive_int():
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        FlatMemory().apply_all([], step=0)


def test_render_shows_the_w_most_recently_written_oldest_first():
    mem = FlatMemory()
    for t, text in enumerate(["a", "b", "c", "d"], start=1):
        mem.apply(ins(text), step=t)
    mem.apply(upd("m1", "a2"), step=5)  # m1 becomes the most recent write
    assert mem.render(2) == "[m4] d\n[m1] a2"
    assert mem.render(10) == "[m2] b\n[m3] c\n[m4] d\n[m1] a2"
    assert mem.render(0) == ""
    assert mem.visible_count(2) == 2 and mem.visible_count(99) == 4


def test_same_step_writes_keep_insertion_order_in_render():
    mem = FlatMemory()
    mem.apply_all([ins("a"), ins("b"), ins("c")], step=1)
    assert mem.render(2) == "[m2] b\n[m3] c"


def test_token_length_counts_the_whole_rendered_memory():
    mem = FlatMemory()
    assert mem.token_length(word_count) == 0
    mem.apply_all([ins("one two"), ins("three")], step=1)
    assert mem.token_length(word_count) == word_count("[m1] one two\n[m2] three") == 5


def test_snapshot_is_a_deep_copy():
    mem = FlatMemory()
    mem.apply(ins("a"), step=1)
    snap = mem.snapshot()
    snap[0].content = "changed"
    assert mem.snapshot()[0].content == "a"


def test_json_round_trip_keeps_the_id_counter():
    mem = FlatMemory()
    mem.apply_all([ins("a"), ins("b"), ins("c")], step=1)
    mem.apply(dele("m3"), step=2)
    back = FlatMemory.from_json(mem.to_json())
    assert back.snapshot() == mem.snapshot() and back.next_id == 4
    assert back.apply(ins("d"), step=3).memory_id == "m4"
    # restore() without the counter continues after the largest live id
    assert FlatMemory.restore(mem.snapshot()).next_id == 3


@pytest.mark.parametrize(
    "items, match",
    [
        ([MemoryItem("x1", "a", 1)], "item 0: bad id 'x1'"),
        ([MemoryItem("m1", "a", 1), MemoryItem("m1", "b", 1)], "item 1: duplicate id 'm1'"),
    ],
)
def test_restore_rejects_bad_snapshots(items, match):
    with pytest.raises(ValueError, match=match):
        FlatMemory.restore(items)
    with pytest.raises(TypeError, match="item 0 \\(m1\\): content must be str and step int"):
        FlatMemory.restore([MemoryItem("m1", "a", "3")])  # type: ignore[arg-type]


def test_from_json_rejects_bad_input():
    with pytest.raises(ValueError, match="cannot read flat memory JSON"):
        FlatMemory.from_json("{not json")
    with pytest.raises(ValueError, match="kind is 'memalpha'"):
        FlatMemory.from_json(MemAlphaMemory().to_json())
    with pytest.raises(ValueError, match="would reuse"):
        FlatMemory.from_json('{"kind": "flat", "next_id": 1, "items": [{"id": "m3", "content": "a", "step": 1}]}')


def test_make_memory():
    assert make_memory("flat").kind == "flat"
    mem = make_memory("memalpha", core_max_tokens=7)
    assert mem.kind == "memalpha" and mem.core_max_tokens == 7
    assert make_memory("flat", core_max_tokens=7).kind == "flat"
    with pytest.raises(ValueError, match="unknown memory kind"):
        make_memory("graph")
    with pytest.raises(ValueError, match="unknown options"):
        make_memory("flat", window=3)


# ---- MemAlphaMemory -------------------------------------------------------------------------
def ma_ins(store, content):
    return call("new_memory_insert", memory_type=store, content=content)


def ma_upd(store, content, mid=None):
    args = {"memory_type": store, "new_content": content}
    if mid is not None:
        args["memory_id"] = mid
    return ToolCall("memory_update", args)


def ma_del(store, mid=None):
    args = {"memory_type": store}
    if mid is not None:
        args["memory_id"] = mid
    return ToolCall("memory_delete", args)


def test_memalpha_stores_have_their_own_ids_and_core_is_an_item():
    mem = MemAlphaMemory()
    res = mem.apply_all(
        [ma_ins("semantic", "Paris is in France."), ma_ins("episodic", "Met Omar at noon."),
         ma_ins("Semantic", "Lena lives in Porto."), ma_upd("core", "User is Mira, a nurse.")],
        step=3,
    )
    assert [(r.op, r.valid, r.memory_id) for r in res] == [
        ("insert", True, "s1"), ("insert", True, "e1"), ("insert", True, "s2"), ("update", True, "core")]
    assert mem.snapshot() == [
        MemoryItem("core", "User is Mira, a nurse.", 3),
        MemoryItem("s1", "Paris is in France.", 3),
        MemoryItem("s2", "Lena lives in Porto.", 3),
        MemoryItem("e1", "Met Omar at noon.", 3),
    ]
    assert mem.apply(ma_upd("semantic", "Lena lives in Lisbon.", "[s2]"), step=4).valid
    assert mem.snapshot()[2] == MemoryItem("s2", "Lena lives in Lisbon.", 4)
    assert mem.apply(ma_del("episodic", 1), step=5).valid
    assert mem.apply(ma_ins("episodic", "x"), step=5).memory_id == "e2"
    assert mem.apply(ma_del("core"), step=6).valid
    assert mem.core == "" and "core" not in [i.id for i in mem.snapshot()]


def test_memalpha_same_content_in_two_stores_is_allowed():
    mem = MemAlphaMemory()
    assert all(r.valid for r in mem.apply_all([ma_ins("semantic", "x"), ma_ins("episodic", "x")], step=1))


@pytest.mark.parametrize(
    "bad_call, op, reason",
    [
        (call("memory_insert", content="x"), "invalid", "unknown tool 'memory_insert'"),
        (ToolCall("new_memory_insert", {}, error="unterminated"), "invalid", "unparsable call"),
        (ma_ins("core", "x"), "insert", "cannot insert into core"),
        (call("new_memory_insert", content="x"), "insert", "missing argument 'memory_type'"),
        (ma_ins("procedural", "x"), "insert", "unknown memory_type 'procedural'"),
        (ma_ins(3, "x"), "insert", "'memory_type' must be a string"),
        (ma_ins("semantic", ""), "insert", "'content' is empty"),
        (ma_ins("semantic", "fact one"), "insert", "exact duplicate of live item s1"),
        (ma_upd("core", "one two three four"), "update", "core has 4 tokens > limit 3"),
        (ma_upd("core", "the core"), "update", "identical to the current content"),
        (ma_upd("core", None), "update", "'new_content' must be a string"),
        (ma_upd("semantic", "y", "e1"), "update", "malformed memory_id 'e1'"),
        (ma_upd("semantic", "y", "s9"), "update", "unknown memory_id s9 in semantic memory"),
        (ma_upd("semantic", "y"), "update", "missing argument 'memory_id'"),
        (ma_upd("semantic", "fact one", "s1"), "update", "identical to the current content"),
        (ma_upd("semantic", "fact two", "s1"), "update", "exact duplicate of live item s2"),
        (ma_del("episodic", "e5"), "delete", "unknown memory_id e5 in episodic memory"),
        (ma_del("semantic"), "delete", "missing argument 'memory_id'"),
    ],
)
def test_memalpha_refusals(bad_call, op, reason):
    mem = MemAlphaMemory(core_max_tokens=3)
    assert all(r.valid for r in mem.apply_all(
        [ma_ins("semantic", "fact one"), ma_ins("semantic", "fact two"), ma_ins("episodic", "event"),
         ma_upd("core", "the core")], step=1))
    before = mem.to_json()
    res = mem.apply(bad_call, step=2)
    assert (res.op, res.valid) == (op, False)
    assert reason in res.reason
    assert mem.to_json() == before


def test_memalpha_deleting_an_empty_core_is_refused():
    res = MemAlphaMemory().apply(ma_del("core"), step=1)
    assert not res.valid and "already empty" in res.reason


def test_memalpha_core_limit_uses_the_given_counter():
    mem = MemAlphaMemory(core_max_tokens=5, count_tokens=len)  # characters
    assert not mem.apply(ma_upd("core", "abcdef"), step=1).valid
    assert mem.apply(ma_upd("core", "abcde"), step=1).valid


def test_memalpha_render_labels_each_store_and_windows_it():
    mem = MemAlphaMemory()
    mem.apply_all([ma_ins("semantic", f"s fact {i}") for i in range(3)], step=1)
    mem.apply(ma_ins("episodic", "an event"), step=2)
    assert mem.render(2) == "Core:\n(empty)\nSemantic:\n[s2] s fact 1\n[s3] s fact 2\nEpisodic:\n[e1] an event"
    assert mem.render(0) == "Core:\n(empty)\nSemantic:\n(hidden)\nEpisodic:\n(hidden)"
    assert mem.visible_count(2) == 3 and mem.visible_count(5) == 4
    assert mem.token_length(word_count) == word_count(mem.render(3))


def test_memalpha_json_round_trip_and_bad_restore():
    mem = MemAlphaMemory(core_max_tokens=9)
    mem.apply_all([ma_ins("semantic", "a"), ma_ins("semantic", "b"), ma_upd("core", "c")], step=2)
    mem.apply(ma_del("semantic", "s2"), step=3)
    back = MemAlphaMemory.from_json(mem.to_json())
    assert back.snapshot() == mem.snapshot() and back.core_max_tokens == 9
    assert back.apply(ma_ins("semantic", "d"), step=4).memory_id == "s3"
    with pytest.raises(ValueError, match="item 0: bad id 'm1'"):
        MemAlphaMemory.restore([MemoryItem("m1", "a", 1)])
    with pytest.raises(ValueError, match="cannot read memalpha memory JSON"):
        MemAlphaMemory.from_json("[]")


# ---- property tests -------------------------------------------------------------------------
CONTENTS = ["alpha", "beta", " alpha ", "gamma", "", "delta", 7]
FLAT_IDS = ["m1", "m2", "m3", "[m4]", 5, "x", "m99", "9" * 4400]


@st.composite
def flat_calls(draw):
    kind = draw(st.sampled_from(["insert", "update", "delete", "bogus"]))
    content = draw(st.sampled_from(CONTENTS))
    mid = draw(st.sampled_from(FLAT_IDS))
    if kind == "insert":
        return ins(content)
    if kind == "update":
        return upd(mid, content)
    if kind == "delete":
        return dele(mid)
    return call("memory_forget", memory_id=mid)


def _check_run(mem_factory, restore, steps):
    """Apply steps, checking ids, stamps and that a restored copy continues identically."""
    mem = mem_factory()
    ever_issued: set[str] = set()
    last_write: dict[str, int] = {}
    for t, calls in enumerate(steps, start=1):
        copy = restore(mem)
        results = mem.apply_all(calls, step=t)
        assert [r.to_dict() for r in copy.apply_all(calls, step=t)] == [r.to_dict() for r in results]
        assert len(results) == max(1, len(calls))
        for r in results:
            if r.valid and r.op == "insert":
                assert r.memory_id not in ever_issued  # never reused
                ever_issued.add(r.memory_id)
            if r.valid and r.op in ("insert", "update"):
                last_write[r.memory_id] = t
            if r.valid and r.op == "delete":
                last_write.pop(r.memory_id, None)
            if not r.valid:
                assert r.reason
        snap = mem.snapshot()
        ids = [i.id for i in snap]
        assert len(ids) == len(set(ids)) == len(mem)
        assert {i.id: i.step for i in snap} == last_write
        for attempt in (restore(mem), type(mem).from_json(mem.to_json())):
            assert attempt.snapshot() == snap
            assert attempt.to_json() == mem.to_json()
            assert attempt.render(2) == mem.render(2)


@settings(max_examples=120, deadline=None)
@given(st.lists(st.lists(flat_calls(), max_size=4), min_size=1, max_size=6))
def test_flat_random_sequences_keep_invariants(steps):
    _check_run(FlatMemory, lambda m: FlatMemory.restore(m.snapshot(), next_id=m.next_id), steps)


@st.composite
def memalpha_calls(draw):
    kind = draw(st.sampled_from(["insert", "update", "delete", "bogus"]))
    store = draw(st.sampled_from(["core", "semantic", "episodic", "semantic", "episodic", "other"]))
    content = draw(st.sampled_from(CONTENTS + ["one two three four five six"]))
    mid = draw(st.sampled_from(["s1", "s2", "e1", "e2", "[s3]", 2, "core", None]))
    if kind == "insert":
        return ma_ins(store, content)
    if kind == "update":
        return ma_upd(store, content, mid)
    if kind == "delete":
        return ma_del(store, mid)
    return call("memory_insert", content=content)


def _restore_memalpha(m: MemAlphaMemory) -> MemAlphaMemory:
    return MemAlphaMemory.from_json(m.to_json())


@settings(max_examples=120, deadline=None)
@given(st.lists(st.lists(memalpha_calls(), max_size=4), min_size=1, max_size=6))
def test_memalpha_random_sequences_keep_invariants(steps):
    _check_run(lambda: MemAlphaMemory(core_max_tokens=4), _restore_memalpha, steps)


def test_refusal_kind_names_every_refusal_of_the_flat_memory():
    """Each way the flat memory refuses a call maps to its own kind (what eval files count)."""
    m = FlatMemory()
    ok = m.apply(ToolCall("memory_insert", {"content": "Ann's city is Rome."}), 1)
    assert ok.valid
    cases = {
        "duplicate": ToolCall("memory_insert", {"content": "Ann's city is Rome."}),
        "unknown_id": ToolCall("memory_update", {"memory_id": "m7", "new_content": "x"}),
        "malformed_id": ToolCall("memory_update", {"memory_id": "mm1", "new_content": "x"}),
        "missing_argument": ToolCall("memory_update", {"memory_id": "m1"}),
        "bad_argument": ToolCall("memory_insert", {"content": 3}),
        "unchanged_update": ToolCall("memory_update", {"memory_id": "m1", "new_content": "Ann's city is Rome."}),
        "unknown_tool": ToolCall("memory_rename", {"memory_id": "m1"}),
        "unparsable": ToolCall("", {}, raw="{oops", error="bad JSON"),
    }
    for kind, call in cases.items():
        op = m.apply(call, 2)
        assert not op.valid
        assert refusal_kind(op.reason) == kind, (kind, op.reason)
    assert refusal_kind(TRUNCATED_REASON) == "truncated"
    assert refusal_kind(PROMPT_TOO_LONG_REASON + ": 2100 tokens") == "prompt_too_long"
    assert refusal_kind("core memory is already empty") == "other"
